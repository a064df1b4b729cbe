// A minimal HTTP/1.1 endpoint for Prometheus: GET /metrics (the registry in text format 0.0.4)
// and GET /healthz ("ok", or 503 "draining" once SetDraining(true)), one request per connection
// (Connection: close). It is served on its own port so /metrics never shows through the gRPC
// ingress.
//
// Probes must answer while anything else is connected: each connection gets its own short-lived
// thread (at most kMaxConnections at once; beyond that a connection gets 503 at once), and the
// whole request must arrive within kRequestTimeout and the reply leave within kReplyTimeout. A
// client that sends one byte a second, or never reads, holds only its own thread, and not for
// long (a per-recv timeout restarted by every byte once let it hold the only thread for hours).
//
// Thread safety: Start/Stop from one thread; SetDraining from any.
#ifndef PERFUSION_SERVER_METRICS_HTTP_H_
#define PERFUSION_SERVER_METRICS_HTTP_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "server/metrics.h"

namespace perfusion::server {

class MetricsHttpServer {
 public:
  // `registry` must outlive the server.
  explicit MetricsHttpServer(const metrics::Registry* registry) : registry_(registry) {}
  ~MetricsHttpServer() { Stop(); }
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  // Binds `address` ("host:port"; host an IPv4 address such as 127.0.0.1 or 0.0.0.0, or
  // "localhost"; port 0 picks a free one) and starts serving. Returns the bound port.
  // INVALID_ARGUMENT for a malformed address, UNAVAILABLE when the bind fails.
  absl::StatusOr<int> Start(const std::string& address);
  // Stops accepting, and waits for the accept thread and for the connections being answered (each
  // ends within its timeouts). Idempotent.
  void Stop();
  void SetDraining(bool draining) { draining_.store(draining); }

  static constexpr int kMaxConnections = 32;
  static constexpr std::chrono::milliseconds kRequestTimeout{2000};
  static constexpr std::chrono::milliseconds kReplyTimeout{5000};

 private:
  void Serve();
  void Handle(int fd);

  const metrics::Registry* registry_;
  int listen_fd_ = -1;
  int wake_pipe_[2] = {-1, -1};
  std::thread thread_;
  std::atomic<bool> draining_{false};
  std::mutex mu_;
  std::condition_variable idle_;
  int active_ = 0;  // connections being answered; guarded by mu_
};

}  // namespace perfusion::server

#endif  // PERFUSION_SERVER_METRICS_HTTP_H_
