// A small Prometheus client: counters, gauges and histograms with labels, rendered in the text
// exposition format 0.0.4 (prometheus-cpp is not packaged in Debian 12).
//
//   metrics::Registry registry;
//   auto& requests = registry.AddCounter("perfusion_generate_requests_total",
//                                        "Generation requests by outcome.", {"outcome"});
//   requests.WithLabels({"ok"}).Inc();
//   std::string text = registry.Render();   // GET /metrics
//
// Families are created once (at startup) and the references they return stay valid for the
// registry's lifetime; so do the children WithLabels() returns, so hot paths keep them.
// Label values must be low-cardinality: never a job, concept or tenant id.
//
// Thread safety: every method is safe to call concurrently. Inc/Set/Observe take no registry
// lock (counter and gauge values are atomics; a histogram locks itself).
#ifndef PERFUSION_SERVER_METRICS_H_
#define PERFUSION_SERVER_METRICS_H_

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace perfusion::server::metrics {

// A monotonically increasing value.
class Counter {
 public:
  // REQUIRES: v >= 0.
  void Inc(double v = 1.0);
  double Value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

// A value that goes up and down.
class Gauge {
 public:
  void Set(double v) { value_.store(v, std::memory_order_relaxed); }
  void Inc(double v = 1.0);
  void Dec(double v = 1.0) { Inc(-v); }
  double Value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

// Observations counted into cumulative buckets (`le` upper bounds, +Inf implied).
// A value equal to a bound lands in that bound's bucket.
class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void Observe(double v);

  struct Snapshot {
    std::vector<double> bounds;
    std::vector<uint64_t> cumulative;  // one per bound, then +Inf (== count)
    double sum = 0;
    uint64_t count = 0;
  };
  Snapshot Get() const;

 private:
  const std::vector<double> bounds_;
  mutable absl::Mutex mu_;
  std::vector<uint64_t> counts_ ABSL_GUARDED_BY(mu_);  // per bucket, not cumulative; last: +Inf
  double sum_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t count_ ABSL_GUARDED_BY(mu_) = 0;
};

// A metric name with a fixed list of label names; one child per distinct label-value tuple.
template <typename T>
class Family {
 public:
  Family(std::string name, std::string help, std::vector<std::string> label_names,
         std::function<std::unique_ptr<T>()> make)
      : name_(std::move(name)), help_(std::move(help)), label_names_(std::move(label_names)),
        make_(std::move(make)) {}

  // The child for these label values (created on first use).
  // REQUIRES: values.size() == number of label names (checked; a mismatch aborts: a bug).
  T& WithLabels(const std::vector<std::string>& values);

  const std::string& name() const { return name_; }
  const std::string& help() const { return help_; }
  const std::vector<std::string>& label_names() const { return label_names_; }
  // Calls fn(values, child) for every child, in label order.
  void ForEach(const std::function<void(const std::vector<std::string>&, const T&)>& fn) const;

 private:
  const std::string name_;
  const std::string help_;
  const std::vector<std::string> label_names_;
  const std::function<std::unique_ptr<T>()> make_;
  mutable absl::Mutex mu_;
  std::map<std::vector<std::string>, std::unique_ptr<T>> children_ ABSL_GUARDED_BY(mu_);
};

using CounterFamily = Family<Counter>;
using GaugeFamily = Family<Gauge>;
using HistogramFamily = Family<Histogram>;

// Bucket bounds.
std::vector<double> ExponentialBuckets(double start, double factor, int count);
// The go-grpc-prometheus defaults extended to 300 s (generation and uploads are slow).
std::vector<double> RpcLatencyBuckets();

class Registry {
 public:
  Registry() = default;
  Registry(const Registry&) = delete;
  Registry& operator=(const Registry&) = delete;

  // Names must match [a-zA-Z_:][a-zA-Z0-9_:]* and be unique in the registry (checked; a bad or
  // repeated name aborts: a bug). Label names must match [a-zA-Z_][a-zA-Z0-9_]*.
  CounterFamily& AddCounter(const std::string& name, const std::string& help,
                            std::vector<std::string> label_names = {});
  GaugeFamily& AddGauge(const std::string& name, const std::string& help,
                        std::vector<std::string> label_names = {});
  HistogramFamily& AddHistogram(const std::string& name, const std::string& help,
                                std::vector<std::string> label_names, std::vector<double> bounds);

  // Runs before each Render(): for gauges computed at scrape time (e.g. counted in the store).
  void AddCollectHook(std::function<void()> hook);

  // Text exposition format 0.0.4, families in registration order.
  std::string Render() const;

 private:
  struct Entry {
    enum Kind { kCounter, kGauge, kHistogram } kind;
    std::unique_ptr<CounterFamily> counter;
    std::unique_ptr<GaugeFamily> gauge;
    std::unique_ptr<HistogramFamily> histogram;
  };
  void CheckNewName(const std::string& name, const std::vector<std::string>& labels) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable absl::Mutex mu_;
  std::vector<Entry> entries_ ABSL_GUARDED_BY(mu_);
  std::vector<std::function<void()>> hooks_ ABSL_GUARDED_BY(mu_);
};

// Formats a sample value as Prometheus expects: shortest round-trip decimal, "+Inf", "-Inf",
// "NaN".
std::string FormatValue(double v);
// Escapes a label value (backslash, double quote, newline).
std::string EscapeLabelValue(const std::string& v);

// ---- template implementation ----
template <typename T>
T& Family<T>::WithLabels(const std::vector<std::string>& values) {
  if (values.size() != label_names_.size()) {
    fprintf(stderr, "metrics: %s takes %zu labels, got %zu\n", name_.c_str(), label_names_.size(),
            values.size());
    abort();
  }
  absl::MutexLock lock(&mu_);
  auto& slot = children_[values];
  if (!slot) slot = make_();
  return *slot;
}

template <typename T>
void Family<T>::ForEach(
    const std::function<void(const std::vector<std::string>&, const T&)>& fn) const {
  absl::MutexLock lock(&mu_);
  for (const auto& [values, child] : children_) fn(values, *child);
}

}  // namespace perfusion::server::metrics

#endif  // PERFUSION_SERVER_METRICS_H_
