// Callback-API reactors whose completion comes from another thread (a scheduler callback)
// rather than from the RPC handler itself.
//
// The hazard they solve: a scheduler callback may run after the RPC ended and its reactor was
// deleted, or before the handler that registered it returned. So every callback captures a
// shared_ptr to a small Shared state (never the reactor), decides under its mutex what to do,
// and only the one thread that wins the decision touches the reactor (StartWrite / Finish),
// outside the mutex. gRPC deletes nothing before Finish, and Finish is called once.
//
// DeferredUnaryReactor<T>: a unary RPC answered later with a T (Deliver, once).
// StreamWriterReactor<Msg>: a server stream fed by Send (coalescing snapshots, so a slow client
// never makes the queue grow) and ended by Close.
#ifndef PERFUSION_SERVER_REACTOR_UTIL_H_
#define PERFUSION_SERVER_REACTOR_UTIL_H_

#include <grpcpp/grpcpp.h>

#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <utility>

#include "absl/synchronization/mutex.h"

namespace perfusion::server {

template <typename T>
class DeferredUnaryReactor : public grpc::ServerUnaryReactor {
 public:
  struct Shared {
    absl::Mutex mu;
    DeferredUnaryReactor* reactor = nullptr;
    bool ready = false;
    bool finished = false;
    bool cancelled = false;
    std::optional<T> result;
    std::optional<grpc::Status> error;
    std::function<void()> on_cancel;  // runs once, when the RPC is cancelled after Ready()
  };

  DeferredUnaryReactor() : shared_(std::make_shared<Shared>()) { shared_->reactor = this; }

  // From any thread, any time; the first of Deliver/Fail wins.
  static void Deliver(const std::shared_ptr<Shared>& s, T result) {
    {
      absl::MutexLock lock(&s->mu);
      if (s->result || s->error || s->finished) return;
      s->result = std::move(result);
    }
    Pump(s);
  }
  static void Fail(const std::shared_ptr<Shared>& s, grpc::Status status) {
    {
      absl::MutexLock lock(&s->mu);
      if (s->result || s->error || s->finished) return;
      s->error = std::move(status);
    }
    Pump(s);
  }

 protected:
  // Writes the response for `result`; returns the RPC status.
  virtual grpc::Status Fill(T result) = 0;

  // Call once the handler is done registering: before it, nothing finishes the RPC.
  // `on_cancel` must not capture the reactor (it may run after the reactor is gone).
  void Ready(std::function<void()> on_cancel) {
    std::shared_ptr<Shared> s = shared_;
    bool cancelled;
    {
      absl::MutexLock lock(&s->mu);
      s->on_cancel = std::move(on_cancel);
      s->ready = true;
      cancelled = s->cancelled;
    }
    if (cancelled && s->on_cancel) s->on_cancel();
    Pump(s);
  }

  std::shared_ptr<Shared> shared() const { return shared_; }

 private:
  static void Pump(const std::shared_ptr<Shared>& s) {
    DeferredUnaryReactor* r;
    std::optional<T> result;
    grpc::Status status;
    {
      absl::MutexLock lock(&s->mu);
      if (!s->ready || s->finished || (!s->result && !s->error)) return;
      s->finished = true;
      r = s->reactor;
      if (s->result) {
        result = std::move(s->result);
      } else {
        status = *s->error;
      }
    }
    if (result) status = r->Fill(std::move(*result));
    r->Finish(status);
  }

  void OnCancel() override {
    std::shared_ptr<Shared> s = shared_;
    bool ready;
    {
      absl::MutexLock lock(&s->mu);
      s->cancelled = true;
      ready = s->ready;
    }
    if (ready && s->on_cancel) s->on_cancel();
  }
  void OnDone() override { delete this; }

  std::shared_ptr<Shared> shared_;
};

template <typename Msg>
class StreamWriterReactor : public grpc::ServerWriteReactor<Msg> {
 public:
  struct Shared {
    absl::Mutex mu;
    StreamWriterReactor* reactor = nullptr;
    bool ready = false;
    bool writing = false;
    bool finished = false;
    bool cancelled = false;
    uint64_t last_seq = 0;
    std::deque<std::pair<Msg, bool>> queue;  // (message, coalescable)
    std::optional<grpc::Status> end;
    Msg current;
    std::function<void()> on_cancel;
    std::function<void()> on_done;
  };

  StreamWriterReactor() : shared_(std::make_shared<Shared>()) { shared_->reactor = this; }

  // Queues `msg` unless the stream is ending or `seq` (when non-zero) is not newer than the
  // last one sent. A coalescable message replaces a coalescable one still queued.
  static void Send(const std::shared_ptr<Shared>& s, Msg msg, uint64_t seq, bool coalescable) {
    {
      absl::MutexLock lock(&s->mu);
      if (s->end || s->finished) return;
      if (seq != 0) {
        if (seq <= s->last_seq) return;
        s->last_seq = seq;
      }
      if (coalescable && !s->queue.empty() && s->queue.back().second) {
        s->queue.back().first = std::move(msg);
      } else {
        s->queue.emplace_back(std::move(msg), coalescable);
      }
    }
    Pump(s);
  }
  // Queues `msg` as the stream's last message and ends it with `status`, in one step: nothing
  // sent meanwhile from another thread (a progress event racing a result) can come after it, as
  // it could between a Send and a Close. `seq` as for Send.
  static void SendLastAndClose(const std::shared_ptr<Shared>& s, Msg msg, uint64_t seq, grpc::Status status) {
    {
      absl::MutexLock lock(&s->mu);
      if (s->end || s->finished) return;
      // A stale message (seq not newer) is dropped, as Send would; the stream still ends.
      if (seq == 0 || seq > s->last_seq) {
        if (seq != 0) s->last_seq = seq;
        s->queue.emplace_back(std::move(msg), /*coalescable=*/false);
      }
      s->end = std::move(status);
    }
    Pump(s);
  }
  // Ends the stream with `status` once the queued messages are written (the first Close wins).
  static void Close(const std::shared_ptr<Shared>& s, grpc::Status status) {
    {
      absl::MutexLock lock(&s->mu);
      if (s->end) return;
      s->end = std::move(status);
    }
    Pump(s);
  }

 protected:
  // As DeferredUnaryReactor::Ready; `on_done` runs when the RPC is over (cleanup).
  void Ready(std::function<void()> on_cancel, std::function<void()> on_done) {
    std::shared_ptr<Shared> s = shared_;
    bool cancelled;
    {
      absl::MutexLock lock(&s->mu);
      s->on_cancel = std::move(on_cancel);
      s->on_done = std::move(on_done);
      s->ready = true;
      cancelled = s->cancelled;
    }
    if (cancelled && s->on_cancel) s->on_cancel();
    Pump(s);
  }
  std::shared_ptr<Shared> shared() const { return shared_; }

 private:
  static void Pump(const std::shared_ptr<Shared>& s) {
    StreamWriterReactor* r;
    bool write = false;
    grpc::Status status;
    {
      absl::MutexLock lock(&s->mu);
      if (!s->ready || s->writing || s->finished) return;
      r = s->reactor;
      if (!s->queue.empty()) {
        s->current = std::move(s->queue.front().first);
        s->queue.pop_front();
        s->writing = true;
        write = true;
      } else if (s->end) {
        s->finished = true;
        status = *s->end;
      } else {
        return;
      }
    }
    if (write) {
      r->StartWrite(&s->current);
    } else {
      r->Finish(status);
    }
  }

  void OnWriteDone(bool ok) override {
    std::shared_ptr<Shared> s = shared_;
    {
      absl::MutexLock lock(&s->mu);
      s->writing = false;
      if (!ok) {
        s->queue.clear();
        if (!s->end) s->end = grpc::Status(grpc::StatusCode::CANCELLED, "client went away");
      }
    }
    Pump(s);
  }
  void OnCancel() override {
    std::shared_ptr<Shared> s = shared_;
    bool ready;
    {
      absl::MutexLock lock(&s->mu);
      s->cancelled = true;
      s->queue.clear();
      if (!s->end) s->end = grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client");
      ready = s->ready;
    }
    if (ready && s->on_cancel) s->on_cancel();
    Pump(s);
  }
  void OnDone() override {
    std::shared_ptr<Shared> s = shared_;
    std::function<void()> done;
    {
      absl::MutexLock lock(&s->mu);
      s->reactor = nullptr;
      done = std::move(s->on_done);
    }
    if (done) done();
    delete this;
  }

  std::shared_ptr<Shared> shared_;
};

}  // namespace perfusion::server

#endif  // PERFUSION_SERVER_REACTOR_UTIL_H_
