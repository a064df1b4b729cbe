// GoogleTest matchers for absl::Status, absl::StatusOr<T> and grpc::Status (local copies of
// Abseil's status_matchers.h, which our abseil lacks):
//
//   EXPECT_THAT(store->GetJob("x"), StatusIs(absl::StatusCode::kNotFound));
//   EXPECT_THAT(stub_status, StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("images")));
//   ASSERT_THAT(result, IsOk());
#ifndef PERFUSION_TESTS_SERVER_STATUS_MATCHERS_H_
#define PERFUSION_TESTS_SERVER_STATUS_MATCHERS_H_

#include <gmock/gmock.h>
#include <grpcpp/support/status.h>

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "server/status_util.h"

namespace perfusion::server::testing {

inline absl::Status AsStatus(const absl::Status& s) { return s; }
inline absl::Status AsStatus(const grpc::Status& s) { return FromGrpcStatus(s); }
template <typename T>
absl::Status AsStatus(const absl::StatusOr<T>& s) {
  return s.status();
}

MATCHER_P(StatusIs, code,
          std::string(negation ? "isn't" : "is") + " a status with code " +
              absl::StatusCodeToString(code)) {
  absl::Status s = AsStatus(arg);
  *result_listener << "which is " << s.ToString();
  return s.code() == code;
}

MATCHER_P2(StatusIs, code, message_matcher,
           std::string(negation ? "isn't" : "is") + " a status with code " +
               absl::StatusCodeToString(code) + " and a matching message") {
  absl::Status s = AsStatus(arg);
  *result_listener << "which is " << s.ToString();
  return s.code() == code &&
         ::testing::ExplainMatchResult(message_matcher, std::string(s.message()),
                                       result_listener);
}

MATCHER(IsOk, negation ? "isn't OK" : "is OK") {
  absl::Status s = AsStatus(arg);
  *result_listener << "which is " << s.ToString();
  return s.ok();
}

}  // namespace perfusion::server::testing

#endif  // PERFUSION_TESTS_SERVER_STATUS_MATCHERS_H_
