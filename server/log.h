// Structured logs: one line per event on stderr, `key=value` pairs after a UTC timestamp and the
// event name, values quoted when they contain spaces, quotes, '=' or control characters (written
// as \n, \r, \t or \xNN, as are C1 controls and bytes that are not UTF-8: a value never breaks
// a line or sends a terminal escape).
//
//   LogEvent("job_submitted", {{"job", id}, {"tenant", tenant}, {"priority", "5"}});
//   -> ts=2024-05-01T12:00:00.123Z event=job_submitted job=job_1a2b tenant=acme priority=5
//
// Thread safety: lines from different threads never interleave.
#ifndef PERFUSION_SERVER_LOG_H_
#define PERFUSION_SERVER_LOG_H_

#include <initializer_list>
#include <string>
#include <utility>

#include "absl/strings/string_view.h"

namespace perfusion::server {

void LogEvent(absl::string_view event,
              std::initializer_list<std::pair<absl::string_view, std::string>> fields);
// Turns logging off (tests) or on. On by default.
void SetLogEnabled(bool enabled);
// A value as LogEvent writes it.
std::string LogValue(absl::string_view v);

}  // namespace perfusion::server

#endif  // PERFUSION_SERVER_LOG_H_
