// TLS end to end on real processes: a server with --tls_cert/--tls_key (a self-signed certificate
// made with the openssl CLI), the client library, perfusionctl and a worker dialing it with the
// certificate as their root, and the failures users meet: plaintext against TLS, an untrusted
// certificate, a name that is not in the certificate.
#include <string>

#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"
#include "tests/integration/cluster.h"

namespace perfusion::testing {
namespace {

// A self-signed certificate for localhost / 127.0.0.1 in dir/<name>.{crt,key}; false on failure.
bool MakeCertificate(const std::string& dir, const std::string& name) {
  CommandResult r = RunCommand(
      {"/usr/bin/env", "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout",
       dir + "/" + name + ".key", "-out", dir + "/" + name + ".crt", "-subj", "/CN=localhost",
       "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"},
      dir, absl::Minutes(1));
  if (r.exit_code != 0) std::cerr << "openssl: " << r.err << "\n";
  return r.exit_code == 0;
}

std::unique_ptr<client::Client> Connect(const std::string& address, bool tls, const std::string& ca,
                                        const std::string& server_name = "") {
  client::ClientOptions o;
  o.server = address;
  o.token = kTokenA;
  o.timeout = absl::Seconds(5);
  o.tls = tls;
  o.tls_ca_file = ca;
  o.tls_server_name = server_name;
  auto c = client::Client::Connect(o);
  return c.ok() ? *std::move(c) : nullptr;
}

using TlsTest = ClusterTest;

TEST_F(TlsTest, ServerClientCliAndWorkerSpeakTlsAndRefuseWhatTheyShould) {
  if (RunCommand({"/usr/bin/env", "openssl", "version"}, cluster_.dir(), absl::Seconds(10)).exit_code != 0) {
    GTEST_SKIP() << "no openssl CLI";
  }
  const std::string dir = cluster_.dir();
  ASSERT_TRUE(MakeCertificate(dir, "server"));
  ASSERT_TRUE(MakeCertificate(dir, "stranger"));
  const std::string ca = dir + "/server.crt";
  ASSERT_TRUE(cluster_.StartServer(
      {/*lease_seconds=*/6, /*max_attempts=*/3,
       {"--tls_cert=" + ca, "--tls_key=" + dir + "/server.key"}}));

  // The client library with the certificate as its root.
  auto good = Connect(cluster_.address(), /*tls=*/true, ca);
  ASSERT_NE(good, nullptr);
  auto concepts = good->ListConcepts();
  EXPECT_TRUE(concepts.ok()) << concepts.status();
  auto health = good->Health("");
  ASSERT_TRUE(health.ok()) << health.status();
  EXPECT_EQ(*health, grpc::health::v1::HealthCheckResponse::SERVING);

  // Plaintext against a TLS port, and TLS with a root that did not sign the server's certificate.
  auto plain = Connect(cluster_.address(), /*tls=*/false, "");
  ASSERT_NE(plain, nullptr);
  EXPECT_EQ(plain->ListConcepts().status().code(), absl::StatusCode::kUnavailable);
  auto untrusted = Connect(cluster_.address(), /*tls=*/true, dir + "/stranger.crt");
  ASSERT_NE(untrusted, nullptr);
  EXPECT_EQ(untrusted->ListConcepts().status().code(), absl::StatusCode::kUnavailable);
  // A name the certificate does not hold.
  auto wrong_name = Connect(cluster_.address(), /*tls=*/true, ca, "perfusion.example.com");
  ASSERT_NE(wrong_name, nullptr);
  EXPECT_EQ(wrong_name->ListConcepts().status().code(), absl::StatusCode::kUnavailable);
  // A missing root file is the caller's error, reported before any RPC.
  client::ClientOptions missing;
  missing.server = cluster_.address();
  missing.tls = true;
  missing.tls_ca_file = dir + "/nope.crt";
  EXPECT_EQ(client::Client::Connect(missing).status().code(), absl::StatusCode::kInvalidArgument);

  // perfusionctl: exit 0 with --tls --tls-ca, 5 (unreachable) in plaintext.
  CommandResult r = cluster_.Ctl({"--tls", "--tls-ca", ca, "health"});
  EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
  r = cluster_.Ctl({"health"});
  EXPECT_EQ(r.exit_code, 5) << r.out << r.err;

  // A worker registers over TLS (StartWorker waits for its "registered" line).
  EXPECT_GE(cluster_.StartWorker("tls-worker", {"--tls", "--tls_ca_file=" + ca}), 0);
}

}  // namespace
}  // namespace perfusion::testing
