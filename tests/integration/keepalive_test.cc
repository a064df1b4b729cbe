// A connection that dies silently (a node gone, packets dropped, no reset) must not hold a
// client's calls until TCP gives up (about 15 minutes): with keepalive pings the channel notices
// the missing answers, drops the connection and dials again. The worker runs with them
// (worker/main.cc); the server accepts their rate (server/server.cc).
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "client/client.h"
#include "tests/integration/cluster.h"

namespace perfusion::testing {
namespace {

// A TCP proxy on loopback whose existing connections can be frozen: from Freeze() on they carry
// nothing either way, yet stay open, as a link through a dead node does. Connections accepted
// after Freeze() work normally.
class FreezingProxy {
 public:
  explicit FreezingProxy(int upstream_port) : upstream_port_(upstream_port) {
    listen_fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = 0;
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    if (bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 && listen(listen_fd_, 16) == 0) {
      socklen_t len = sizeof addr;
      getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len);
      port_ = ntohs(addr.sin_port);
    }
    accept_thread_ = std::thread([this] { AcceptLoop(); });
  }
  ~FreezingProxy() {
    stop_ = true;
    accept_thread_.join();
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& t : pumps_) t.join();
    close(listen_fd_);
  }
  int port() const { return port_; }
  void Freeze() { frozen_generation_ = generation_.load(); }
  int connections() const { return generation_.load(); }

 private:
  void AcceptLoop() {
    while (!stop_) {
      pollfd p{listen_fd_, POLLIN, 0};
      if (poll(&p, 1, 100) <= 0) continue;
      const int client = accept(listen_fd_, nullptr, nullptr);
      if (client < 0) continue;
      const int upstream = ConnectUpstream();
      if (upstream < 0) {
        close(client);
        continue;
      }
      const int generation = ++generation_;
      std::lock_guard<std::mutex> lock(mu_);
      pumps_.emplace_back([this, client, upstream, generation] { Pump(client, upstream, generation); });
    }
  }
  int ConnectUpstream() const {
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(upstream_port_));
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
      close(fd);
      return -1;
    }
    return fd;
  }
  void Pump(int a, int b, int generation) {
    char buf[16384];
    while (!stop_) {
      if (generation <= frozen_generation_) {  // frozen: hold both ends open, move nothing
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        continue;
      }
      pollfd p[2] = {{a, POLLIN, 0}, {b, POLLIN, 0}};
      if (poll(p, 2, 100) <= 0) continue;
      bool closed = false;
      for (int i = 0; i < 2 && !closed; ++i) {
        if (!(p[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
        const ssize_t n = read(p[i].fd, buf, sizeof buf);
        if (n <= 0) {
          closed = true;
          break;
        }
        const int to = i == 0 ? b : a;
        for (ssize_t sent = 0; sent < n;) {
          const ssize_t w = send(to, buf + sent, n - sent, MSG_NOSIGNAL);
          if (w <= 0) {
            closed = true;
            break;
          }
          sent += w;
        }
      }
      if (closed) break;
    }
    close(a);
    close(b);
  }

  const int upstream_port_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<int> generation_{0};
  std::atomic<int> frozen_generation_{0};
  std::mutex mu_;
  std::vector<std::thread> pumps_;
  std::thread accept_thread_;
};

TEST(KeepaliveTest, ASilentlyDeadConnectionIsDroppedAndRedialled) {
  Cluster c;
  ASSERT_TRUE(c.Init());
  ASSERT_TRUE(c.StartServer());
  FreezingProxy proxy(c.port());
  ASSERT_GT(proxy.port(), 0);

  client::ClientOptions o;
  o.server = "127.0.0.1:" + std::to_string(proxy.port());
  o.token = kTokenA;
  o.timeout = absl::Seconds(60);
  o.max_reconnect_backoff = absl::Seconds(1);
  o.keepalive = absl::Seconds(1);
  o.keepalive_timeout = absl::Seconds(1);
  auto client = client::Client::Connect(o);
  ASSERT_TRUE(client.ok()) << client.status();
  ASSERT_TRUE((*client)->ListConcepts().ok());
  ASSERT_EQ(proxy.connections(), 1);

  proxy.Freeze();
  // Without keepalive this call would wait out its whole 60 s deadline on the dead connection.
  // With it the connection is dropped after a ping goes unanswered: the call fails UNAVAILABLE
  // (or succeeds, if the channel had already redialled), and the next call goes through a new
  // connection.
  const auto start = std::chrono::steady_clock::now();
  auto first = (*client)->ListConcepts();
  EXPECT_NE(first.status().code(), absl::StatusCode::kDeadlineExceeded) << first.status();
  absl::Status after = first.status();
  for (int i = 0; i < 5 && !after.ok(); ++i) after = (*client)->ListConcepts().status();
  EXPECT_TRUE(after.ok()) << after;
  EXPECT_GE(proxy.connections(), 2) << "the channel dialled again";
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(50))
      << "the dead connection held the calls";
}

}  // namespace
}  // namespace perfusion::testing
