// Unit tests of the worker's and client's small parts (no server, no model): the blob cache and
// the command-line parser.
#include <string>

#include <gtest/gtest.h>

#include "client/cli_args.h"
#include "client/client.h"
#include "worker/blob_cache.h"

namespace perfusion {
namespace {

using worker::BlobCache;
using worker::Sha256Hex;

TEST(BlobCacheTest, Sha256HexMatchesKnownDigests) {
  EXPECT_EQ(Sha256Hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(Sha256Hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST(BlobCacheTest, GetReturnsWhatPutStoredAndCountsHitsAndMisses) {
  BlobCache cache(1000);
  EXPECT_EQ(cache.Get("a"), nullptr);
  cache.Put("a", "blob-a");
  auto a = cache.Get("a");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(*a, "blob-a");
  const BlobCache::Stats s = cache.stats();
  EXPECT_EQ(s.hits, 1);
  EXPECT_EQ(s.misses, 1);
  EXPECT_EQ(s.entries, 1);
  EXPECT_EQ(s.bytes, 6);
}

TEST(BlobCacheTest, EvictsLeastRecentlyUsedToStayWithinCapacity) {
  BlobCache cache(30);
  cache.Put("a", std::string(10, 'a'));
  cache.Put("b", std::string(10, 'b'));
  cache.Put("c", std::string(10, 'c'));
  ASSERT_NE(cache.Get("a"), nullptr);  // a is now the most recently used
  cache.Put("d", std::string(10, 'd'));  // evicts b, the least recently used
  EXPECT_EQ(cache.Get("b"), nullptr);
  EXPECT_NE(cache.Get("a"), nullptr);
  EXPECT_NE(cache.Get("c"), nullptr);
  EXPECT_NE(cache.Get("d"), nullptr);
  const BlobCache::Stats s = cache.stats();
  EXPECT_LE(s.bytes, 30);
  EXPECT_EQ(s.evictions, 1);
}

TEST(BlobCacheTest, BlobLargerThanCapacityIsReturnedButNotKept) {
  BlobCache cache(5);
  auto big = cache.Put("big", "0123456789");
  ASSERT_NE(big, nullptr);
  EXPECT_EQ(*big, "0123456789");
  EXPECT_EQ(cache.Get("big"), nullptr);
  EXPECT_EQ(cache.stats().bytes, 0);
}

TEST(BlobCacheTest, EvictedBlobStaysValidForItsHolder) {
  BlobCache cache(10);
  auto a = cache.Put("a", std::string(10, 'a'));
  cache.Put("b", std::string(10, 'b'));  // evicts a
  EXPECT_EQ(cache.Get("a"), nullptr);
  EXPECT_EQ(*a, std::string(10, 'a'));
}

TEST(BlobCacheTest, PutOfSameDigestReplacesWithoutDoubleCounting) {
  BlobCache cache(100);
  cache.Put("a", "12345");
  cache.Put("a", "12345");
  EXPECT_EQ(cache.stats().bytes, 5);
  EXPECT_EQ(cache.stats().entries, 1);
}

const std::vector<client::FlagSpec> kSpecs = {
    {"server", true}, {"wait", false}, {"label", true}, {"out", true, "o"}, {"no-wait", false}};

TEST(CliArgsTest, FlagsMayComeAnywhereInBothForms) {
  auto a = client::ParsedArgs::Parse(
      {"--server=h:1", "train", "dir", "-o", "x", "--label", "a=1", "--label=b=2", "--wait"},
      kSpecs);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->positionals(), (std::vector<std::string>{"train", "dir"}));
  EXPECT_EQ(a->Get("server"), "h:1");
  EXPECT_EQ(a->Get("out"), "x");
  EXPECT_EQ(a->GetAll("label"), (std::vector<std::string>{"a=1", "b=2"}));
  EXPECT_TRUE(a->Has("wait"));
}

TEST(CliArgsTest, UnderscoresAndDashesAreTheSame) {
  auto a = client::ParsedArgs::Parse({"--no_wait"}, kSpecs);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_TRUE(a->Has("no-wait"));
}

TEST(CliArgsTest, RejectsUnknownFlagsMissingValuesAndValuedBooleans) {
  EXPECT_EQ(client::ParsedArgs::Parse({"--bogus"}, kSpecs).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(client::ParsedArgs::Parse({"--server"}, kSpecs).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(client::ParsedArgs::Parse({"--wait=maybe"}, kSpecs).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(CliArgsTest, DoubleDashEndsFlags) {
  auto a = client::ParsedArgs::Parse({"generate", "--", "--not-a-flag"}, kSpecs);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->positionals(), (std::vector<std::string>{"generate", "--not-a-flag"}));
}

TEST(CliArgsTest, DurationsAcceptUnitsAndPlainSeconds) {
  const std::vector<client::FlagSpec> specs = {{"timeout", true}};
  auto a = client::ParsedArgs::Parse({"--timeout", "1m30s"}, specs);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(*a->GetDuration("timeout", absl::ZeroDuration()), absl::Seconds(90));
  a = client::ParsedArgs::Parse({"--timeout", "2.5"}, specs);
  EXPECT_EQ(*a->GetDuration("timeout", absl::ZeroDuration()), absl::Milliseconds(2500));
  a = client::ParsedArgs::Parse({"--timeout", "soon"}, specs);
  EXPECT_EQ(a->GetDuration("timeout", absl::ZeroDuration()).status().code(),
            absl::StatusCode::kInvalidArgument);
  // An infinite span would overflow a call's deadline: refused, not passed on.
  for (const char* endless : {"inf", "1e300"}) {
    a = client::ParsedArgs::Parse({"--timeout", endless}, specs);
    EXPECT_EQ(a->GetDuration("timeout", absl::ZeroDuration()).status().code(), absl::StatusCode::kInvalidArgument)
        << endless;
  }
}

// Numbers are read into the type of the request field they fill, and refused when they do not fit.
TEST(CliArgsTest, NumbersMustFitTheirRequestFields) {
  const std::vector<client::FlagSpec> specs = {{"n", true}, {"seed", true}, {"x", true}};
  auto parse = [&](const std::string& flag, const std::string& value) {
    auto a = client::ParsedArgs::Parse({"--" + flag, value}, specs);
    EXPECT_TRUE(a.ok());
    return *a;
  };
  EXPECT_EQ(*parse("n", "2147483647").GetInt32("n", 0), 2147483647);
  EXPECT_EQ(*parse("n", "-2147483648").GetInt32("n", 0), INT32_MIN);
  for (const char* bad : {"2147483648", "4294967297", "-2147483649", "3.0", "x"}) {
    EXPECT_EQ(parse("n", bad).GetInt32("n", 0).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  EXPECT_EQ(*parse("seed", "18446744073709551615").GetUint64("seed", 0), UINT64_MAX);
  EXPECT_EQ(*parse("seed", "0").GetUint64("seed", 7), 0u);
  for (const char* bad : {"-1", "-0", "18446744073709551616", "1e3", ""}) {
    EXPECT_EQ(parse("seed", bad).GetUint64("seed", 0).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  EXPECT_FLOAT_EQ(*parse("x", "7.5").GetFloat("x", 0), 7.5f);
  EXPECT_FLOAT_EQ(*parse("x", "-1e30").GetFloat("x", 0), -1e30f);
  for (const char* bad : {"nan", "inf", "-inf", "1e40", "1e400", "0x"}) {
    EXPECT_EQ(parse("x", bad).GetFloat("x", 0).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  auto none = client::ParsedArgs::Parse({}, specs);
  EXPECT_EQ(*none->GetInt32("n", 5), 5);
  EXPECT_EQ(*none->GetUint64("seed", 9), 9u);
  EXPECT_FLOAT_EQ(*none->GetFloat("x", 0.5f), 0.5f);
}

// --flag=false reads as absent, as before; a command that has a default of true (train waits)
// can still tell it was switched off.
TEST(CliArgsTest, ABooleanSetToFalseIsAbsentButKnown) {
  auto a = client::ParsedArgs::Parse({"--wait=false"}, kSpecs);
  ASSERT_TRUE(a.ok());
  EXPECT_FALSE(a->Has("wait"));
  EXPECT_TRUE(a->SetFalse("wait"));
  a = client::ParsedArgs::Parse({"--wait=false", "--wait"}, kSpecs);
  ASSERT_TRUE(a.ok());
  EXPECT_TRUE(a->Has("wait"));
}

TEST(ClientTest, ConceptRefsParseIdsNamesAndVersions) {
  auto id = client::ParseConceptRef("cpt_00ff");
  ASSERT_TRUE(id.ok());
  EXPECT_EQ(id->id, "cpt_00ff");
  auto name = client::ParseConceptRef("rex");
  ASSERT_TRUE(name.ok());
  EXPECT_EQ(name->name, "rex");
  EXPECT_EQ(name->version, 0);
  auto v = client::ParseConceptRef("rex@2");
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->name, "rex");
  EXPECT_EQ(v->version, 2);
  EXPECT_EQ(client::ParseConceptRef("rex@0").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(client::ParseConceptRef("").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ClientTest, TokensComeFromTheFirstNonCommentLine) {
  EXPECT_EQ(client::TokenFromText("acme-secret"), "acme-secret");
  EXPECT_EQ(client::TokenFromText("acme-secret\n"), "acme-secret");
  EXPECT_EQ(client::TokenFromText("\r\n# tenant acme\n  acme-secret \r\nother\n"), "acme-secret");
  EXPECT_EQ(client::TokenFromText("# only a comment\n\n"), "");
  EXPECT_EQ(client::TokenFromText(""), "");
}

TEST(ClientTest, TokensThatAHeaderCannotCarryAreRefusedNotSent) {
  EXPECT_TRUE(client::CheckToken("acme-secret_0.9~", "--token").ok());
  EXPECT_TRUE(client::CheckToken("", "--token").ok());
  const absl::Status nl = client::CheckToken("acme\nsecret", "--token-file t");
  EXPECT_EQ(nl.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(nl.message().find("--token-file t"), std::string::npos) << nl;
  EXPECT_NE(nl.message().find("0x0a"), std::string::npos) << nl;
  EXPECT_EQ(client::CheckToken("caf\xc3\xa9", "--token").code(), absl::StatusCode::kInvalidArgument);
  // Connect refuses it before any call: gRPC would abort the process on such a header value.
  client::ClientOptions o;
  o.server = "127.0.0.1:1";
  o.token = "a\tb";
  EXPECT_EQ(client::Client::Connect(o).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ClientTest, ExitCodesFollowTheDocumentedTable) {
  EXPECT_EQ(client::ExitCodeFor(absl::StatusCode::kOk), 0);
  EXPECT_EQ(client::ExitCodeFor(absl::StatusCode::kNotFound), 3);
  EXPECT_EQ(client::ExitCodeFor(absl::StatusCode::kInvalidArgument), 4);
  EXPECT_EQ(client::ExitCodeFor(absl::StatusCode::kUnavailable), 5);
  EXPECT_EQ(client::ExitCodeFor(absl::StatusCode::kUnauthenticated), 6);
  EXPECT_EQ(client::ExitCodeFor(absl::StatusCode::kPermissionDenied), 6);
  EXPECT_EQ(client::ExitCodeFor(absl::StatusCode::kInternal), 1);
}

}  // namespace
}  // namespace perfusion
