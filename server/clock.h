// The server's time source, injected (LevelDB's Env idea) so that lease expiry, deadlines and
// durations are tested with a fake clock that never sleeps.
//
// Thread safety: implementations are safe to call from any thread.
#ifndef PERFUSION_SERVER_CLOCK_H_
#define PERFUSION_SERVER_CLOCK_H_

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace perfusion::server {

class Clock {
 public:
  virtual ~Clock() = default;
  virtual absl::Time Now() const = 0;
};

// The wall clock (absl::Now()), in whole microseconds: the stores keep microseconds, so a time
// read back equals the one written (a nanosecond update_time written and read back as another
// value made the shared-store poll see a change that was not one, and send watchers a duplicate).
class RealClock final : public Clock {
 public:
  absl::Time Now() const override { return absl::FromUnixMicros(absl::ToUnixMicros(absl::Now())); }
  // A process-wide instance.
  static RealClock* Get() {
    static RealClock clock;
    return &clock;
  }
};

// A clock that moves only when told to. Starts at a fixed, arbitrary time.
class FakeClock final : public Clock {
 public:
  FakeClock() : now_(absl::FromUnixSeconds(1700000000)) {}
  absl::Time Now() const override {
    absl::MutexLock lock(&mu_);
    return now_;
  }
  void Advance(absl::Duration d) {
    absl::MutexLock lock(&mu_);
    now_ += d;
  }

 private:
  mutable absl::Mutex mu_;
  absl::Time now_ ABSL_GUARDED_BY(mu_);
};

}  // namespace perfusion::server

#endif  // PERFUSION_SERVER_CLOCK_H_
