#include "server/metrics.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "absl/strings/str_cat.h"

namespace perfusion::server::metrics {
namespace {

void AtomicAdd(std::atomic<double>& a, double v) {
  double cur = a.load(std::memory_order_relaxed);
  while (!a.compare_exchange_weak(cur, cur + v, std::memory_order_relaxed)) {
  }
}

bool ValidName(const std::string& n, bool allow_colon) {
  if (n.empty()) return false;
  for (size_t i = 0; i < n.size(); ++i) {
    char c = n[i];
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
              (allow_colon && c == ':') || (i > 0 && c >= '0' && c <= '9');
    if (!ok) return false;
  }
  return true;
}

std::string LabelSet(const std::vector<std::string>& names, const std::vector<std::string>& values,
                     const std::string& extra_name = "", const std::string& extra_value = "") {
  if (names.empty() && extra_name.empty()) return "";
  std::string out = "{";
  for (size_t i = 0; i < names.size(); ++i) {
    if (i) out += ",";
    absl::StrAppend(&out, names[i], "=\"", EscapeLabelValue(values[i]), "\"");
  }
  if (!extra_name.empty()) {
    if (!names.empty()) out += ",";
    absl::StrAppend(&out, extra_name, "=\"", EscapeLabelValue(extra_value), "\"");
  }
  out += "}";
  return out;
}

}  // namespace

void Counter::Inc(double v) {
  if (v < 0) return;  // a counter never goes down
  AtomicAdd(value_, v);
}

void Gauge::Inc(double v) { AtomicAdd(value_, v); }

Histogram::Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)) {
  absl::MutexLock lock(&mu_);
  counts_.assign(bounds_.size() + 1, 0);
}

void Histogram::Observe(double v) {
  size_t i = 0;
  while (i < bounds_.size() && v > bounds_[i]) ++i;
  absl::MutexLock lock(&mu_);
  ++counts_[i];
  sum_ += v;
  ++count_;
}

Histogram::Snapshot Histogram::Get() const {
  Snapshot s;
  s.bounds = bounds_;
  absl::MutexLock lock(&mu_);
  uint64_t acc = 0;
  for (uint64_t c : counts_) {
    acc += c;
    s.cumulative.push_back(acc);
  }
  s.sum = sum_;
  s.count = count_;
  return s;
}

std::vector<double> ExponentialBuckets(double start, double factor, int count) {
  std::vector<double> b;
  double v = start;
  for (int i = 0; i < count; ++i, v *= factor) b.push_back(v);
  return b;
}

std::vector<double> RpcLatencyBuckets() {
  return {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300};
}

void Registry::CheckNewName(const std::string& name, const std::vector<std::string>& labels) const {
  bool bad = !ValidName(name, true);
  for (const auto& l : labels) bad = bad || !ValidName(l, false) || l == "le";
  for (const auto& e : entries_) {
    const std::string& n = e.kind == Entry::kCounter ? e.counter->name()
                           : e.kind == Entry::kGauge ? e.gauge->name()
                                                     : e.histogram->name();
    bad = bad || n == name;
  }
  if (bad) {
    fprintf(stderr, "metrics: invalid or duplicate metric %s\n", name.c_str());
    abort();
  }
}

CounterFamily& Registry::AddCounter(const std::string& name, const std::string& help,
                                    std::vector<std::string> label_names) {
  absl::MutexLock lock(&mu_);
  CheckNewName(name, label_names);
  Entry e{Entry::kCounter, nullptr, nullptr, nullptr};
  e.counter = std::make_unique<CounterFamily>(name, help, std::move(label_names),
                                              [] { return std::make_unique<Counter>(); });
  entries_.push_back(std::move(e));
  return *entries_.back().counter;
}

GaugeFamily& Registry::AddGauge(const std::string& name, const std::string& help,
                                std::vector<std::string> label_names) {
  absl::MutexLock lock(&mu_);
  CheckNewName(name, label_names);
  Entry e{Entry::kGauge, nullptr, nullptr, nullptr};
  e.gauge = std::make_unique<GaugeFamily>(name, help, std::move(label_names),
                                          [] { return std::make_unique<Gauge>(); });
  entries_.push_back(std::move(e));
  return *entries_.back().gauge;
}

HistogramFamily& Registry::AddHistogram(const std::string& name, const std::string& help,
                                        std::vector<std::string> label_names,
                                        std::vector<double> bounds) {
  absl::MutexLock lock(&mu_);
  CheckNewName(name, label_names);
  Entry e{Entry::kHistogram, nullptr, nullptr, nullptr};
  e.histogram = std::make_unique<HistogramFamily>(
      name, help, std::move(label_names),
      [bounds] { return std::make_unique<Histogram>(bounds); });
  entries_.push_back(std::move(e));
  return *entries_.back().histogram;
}

void Registry::AddCollectHook(std::function<void()> hook) {
  absl::MutexLock lock(&mu_);
  hooks_.push_back(std::move(hook));
}

std::string Registry::Render() const {
  std::vector<std::function<void()>> hooks;
  {
    absl::MutexLock lock(&mu_);
    hooks = hooks_;
  }
  for (auto& h : hooks) h();

  std::string out;
  absl::MutexLock lock(&mu_);
  auto header = [&out](const std::string& name, const std::string& help, const char* type) {
    std::string h;
    for (char c : help) {
      if (c == '\\') h += "\\\\";
      else if (c == '\n') h += "\\n";
      else h += c;
    }
    absl::StrAppend(&out, "# HELP ", name, " ", h, "\n# TYPE ", name, " ", type, "\n");
  };
  for (const auto& e : entries_) {
    if (e.kind == Entry::kCounter) {
      const auto& f = *e.counter;
      header(f.name(), f.help(), "counter");
      f.ForEach([&](const std::vector<std::string>& v, const Counter& c) {
        absl::StrAppend(&out, f.name(), LabelSet(f.label_names(), v), " ", FormatValue(c.Value()),
                        "\n");
      });
    } else if (e.kind == Entry::kGauge) {
      const auto& f = *e.gauge;
      header(f.name(), f.help(), "gauge");
      f.ForEach([&](const std::vector<std::string>& v, const Gauge& g) {
        absl::StrAppend(&out, f.name(), LabelSet(f.label_names(), v), " ", FormatValue(g.Value()),
                        "\n");
      });
    } else {
      const auto& f = *e.histogram;
      header(f.name(), f.help(), "histogram");
      f.ForEach([&](const std::vector<std::string>& v, const Histogram& h) {
        Histogram::Snapshot s = h.Get();
        for (size_t i = 0; i <= s.bounds.size(); ++i) {
          std::string le = i < s.bounds.size() ? FormatValue(s.bounds[i]) : "+Inf";
          absl::StrAppend(&out, f.name(), "_bucket", LabelSet(f.label_names(), v, "le", le), " ",
                          s.cumulative[i], "\n");
        }
        absl::StrAppend(&out, f.name(), "_sum", LabelSet(f.label_names(), v), " ",
                        FormatValue(s.sum), "\n");
        absl::StrAppend(&out, f.name(), "_count", LabelSet(f.label_names(), v), " ", s.count,
                        "\n");
      });
    }
  }
  return out;
}

std::string FormatValue(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char buf[64];
  for (int precision = 15; precision <= 17; ++precision) {
    snprintf(buf, sizeof buf, "%.*g", precision, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  return buf;
}

std::string EscapeLabelValue(const std::string& v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\\') out += "\\\\";
    else if (c == '"') out += "\\\"";
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}

}  // namespace perfusion::server::metrics
