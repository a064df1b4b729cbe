#include "server/metrics_http.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace perfusion::server {
namespace {

using Clock = std::chrono::steady_clock;

// Milliseconds left before `deadline` (0 once it has passed).
int MillisLeft(Clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  return left.count() > 0 ? static_cast<int>(left.count()) : 0;
}

// Waits until `fd` is ready for `events` or the deadline passes; false on timeout or error.
bool WaitFor(int fd, short events, Clock::time_point deadline) {
  for (;;) {
    const int left = MillisLeft(deadline);
    if (left == 0) return false;
    pollfd p{fd, events, 0};
    const int n = ::poll(&p, 1, left);
    if (n < 0 && errno == EINTR) continue;
    return n > 0 && (p.revents & (events | POLLHUP | POLLERR)) != 0;
  }
}

// Sends all of `data` before `deadline`, or gives up (a client that does not read).
void WriteAll(int fd, const std::string& data, Clock::time_point deadline) {
  size_t off = 0;
  while (off < data.size()) {
    if (!WaitFor(fd, POLLOUT, deadline)) return;
    ssize_t n = ::send(fd, data.data() + off, data.size() - off, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) continue;
    if (n <= 0) return;
    off += static_cast<size_t>(n);
  }
}

std::string Response(int code, const char* reason, const std::string& content_type,
                     const std::string& body, bool head) {
  std::string out = absl::StrCat("HTTP/1.1 ", code, " ", reason, "\r\nContent-Type: ",
                                 content_type, "\r\nContent-Length: ", body.size(),
                                 "\r\nConnection: close\r\n\r\n");
  if (!head) out += body;
  return out;
}

}  // namespace

absl::StatusOr<int> MetricsHttpServer::Start(const std::string& address) {
  if (listen_fd_ >= 0) return absl::FailedPreconditionError("metrics server already started");
  size_t colon = address.rfind(':');
  int port = 0;
  if (colon == std::string::npos || !absl::SimpleAtoi(address.substr(colon + 1), &port) ||
      port < 0 || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics_listen: \"", address, "\" is not host:port"));
  }
  std::string host = address.substr(0, colon);
  if (host.empty() || host == "localhost") host = host.empty() ? "0.0.0.0" : "127.0.0.1";
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (inet_pton(AF_INET, host.c_str(), &addr.sin_addr) != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics_listen: \"", host, "\" is not an IPv4 address"));
  }
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return absl::UnavailableError(absl::StrCat("metrics: socket: ", strerror(errno)));
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 || ::listen(fd, 16) != 0) {
    std::string err = strerror(errno);
    ::close(fd);
    return absl::UnavailableError(absl::StrCat("metrics: cannot listen on ", address, ": ", err));
  }
  socklen_t len = sizeof addr;
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  if (::pipe2(wake_pipe_, O_CLOEXEC) != 0) {
    ::close(fd);
    return absl::UnavailableError(absl::StrCat("metrics: pipe: ", strerror(errno)));
  }
  listen_fd_ = fd;
  thread_ = std::thread([this] { Serve(); });
  return ntohs(addr.sin_port);
}

void MetricsHttpServer::Stop() {
  if (listen_fd_ < 0) return;
  char c = 'x';
  (void)!::write(wake_pipe_[1], &c, 1);
  if (thread_.joinable()) thread_.join();
  {
    std::unique_lock<std::mutex> lock(mu_);
    idle_.wait(lock, [this] { return active_ == 0; });
  }
  ::close(listen_fd_);
  ::close(wake_pipe_[0]);
  ::close(wake_pipe_[1]);
  listen_fd_ = -1;
}

void MetricsHttpServer::Serve() {
  for (;;) {
    pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {wake_pipe_[0], POLLIN, 0}};
    int n = ::poll(fds, 2, -1);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 || (fds[1].revents & POLLIN)) return;
    if (fds[0].revents & POLLIN) {
      int conn = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (conn < 0) continue;
      bool busy;
      {
        std::lock_guard<std::mutex> lock(mu_);
        busy = active_ >= kMaxConnections;
        if (!busy) ++active_;
      }
      if (busy) {
        WriteAll(conn, Response(503, "Service Unavailable", "text/plain", "busy\n", false),
                 Clock::now() + std::chrono::milliseconds(100));
        ::close(conn);
        continue;
      }
      std::thread([this, conn] {
        Handle(conn);
        ::close(conn);
        std::lock_guard<std::mutex> lock(mu_);
        if (--active_ == 0) idle_.notify_all();
      }).detach();
    }
  }
}

void MetricsHttpServer::Handle(int fd) {
  // One deadline for the whole request, however the bytes trickle in.
  const Clock::time_point request_deadline = Clock::now() + kRequestTimeout;
  std::string req;
  char buf[2048];
  bool timed_out = false;
  while (req.find("\r\n\r\n") == std::string::npos && req.size() < 16384) {
    if (!WaitFor(fd, POLLIN, request_deadline)) {
      timed_out = true;
      break;
    }
    ssize_t n = ::recv(fd, buf, sizeof buf, MSG_DONTWAIT);
    if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) continue;
    if (n <= 0) break;  // the client closed its side: answer what arrived
    req.append(buf, static_cast<size_t>(n));
  }
  const Clock::time_point reply_deadline = Clock::now() + kReplyTimeout;
  auto Reply = [&](const std::string& data) { WriteAll(fd, data, reply_deadline); };
  if (timed_out) {
    Reply(Response(408, "Request Timeout", "text/plain", "request timeout\n", false));
    return;
  }
  std::string line = req.substr(0, req.find("\r\n"));
  std::vector<std::string> parts = absl::StrSplit(line, ' ', absl::SkipEmpty());
  if (parts.size() < 2) {
    Reply(Response(400, "Bad Request", "text/plain", "bad request\n", false));
    return;
  }
  const std::string& method = parts[0];
  std::string path = parts[1].substr(0, parts[1].find('?'));
  bool head = method == "HEAD";
  if (method != "GET" && !head) {
    Reply(Response(405, "Method Not Allowed", "text/plain", "GET only\n", false));
    return;
  }
  if (path == "/metrics") {
    Reply(Response(200, "OK", "text/plain; version=0.0.4; charset=utf-8",
                          registry_->Render(), head));
  } else if (path == "/healthz") {
    if (draining_.load()) {
      Reply(Response(503, "Service Unavailable", "text/plain", "draining\n", head));
    } else {
      Reply(Response(200, "OK", "text/plain", "ok\n", head));
    }
  } else {
    Reply(Response(404, "Not Found", "text/plain", "not found\n", head));
  }
}

}  // namespace perfusion::server
