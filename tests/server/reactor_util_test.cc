// The ordering rules of StreamWriterReactor's shared state, checked on the state itself (no RPC is
// needed: before Ready() nothing is written, so the queue shows exactly what would be sent).
#include "server/reactor_util.h"

#include <gtest/gtest.h>

#include <memory>

#include "perfusion/v1/generation.pb.h"

namespace perfusion::server {
namespace {

using Stream = StreamWriterReactor<v1::GenerateEvent>;

v1::GenerateEvent Progress(int step) {
  v1::GenerateEvent e;
  e.mutable_progress()->set_step(step);
  return e;
}

// A result told apart by its compute time.
v1::GenerateEvent Result(int64_t compute_seconds) {
  v1::GenerateEvent e;
  e.mutable_result()->mutable_compute_duration()->set_seconds(compute_seconds);
  return e;
}

TEST(StreamWriterReactorTest, NothingFollowsTheLastMessage) {
  auto s = std::make_shared<Stream::Shared>();
  Stream::Send(s, Progress(1), 0, /*coalescable=*/true);
  Stream::SendLastAndClose(s, Result(1), 0, grpc::Status::OK);
  // A heartbeat that lost the race to the result: it must not be written after it.
  Stream::Send(s, Progress(2), 0, /*coalescable=*/true);
  Stream::Send(s, Progress(3), 0, /*coalescable=*/false);
  ASSERT_EQ(s->queue.size(), 2u);
  EXPECT_EQ(s->queue[0].first.progress().step(), 1);
  EXPECT_TRUE(s->queue[1].first.has_result());
  EXPECT_EQ(s->queue[1].first.result().compute_duration().seconds(), 1);
  ASSERT_TRUE(s->end.has_value());
  EXPECT_TRUE(s->end->ok());
}

TEST(StreamWriterReactorTest, AResultIsNeverCoalescedAway) {
  auto s = std::make_shared<Stream::Shared>();
  Stream::Send(s, Progress(1), 0, /*coalescable=*/true);
  Stream::Send(s, Progress(2), 0, /*coalescable=*/true);  // replaces step 1, still queued
  Stream::SendLastAndClose(s, Result(1), 0, grpc::Status::OK);
  ASSERT_EQ(s->queue.size(), 2u);
  EXPECT_EQ(s->queue[0].first.progress().step(), 2);
  EXPECT_TRUE(s->queue[1].first.has_result());
}

TEST(StreamWriterReactorTest, TheFirstEndWins) {
  auto s = std::make_shared<Stream::Shared>();
  Stream::Close(s, grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "late"));
  Stream::SendLastAndClose(s, Result(1), 0, grpc::Status::OK);
  EXPECT_TRUE(s->queue.empty());
  ASSERT_TRUE(s->end.has_value());
  EXPECT_EQ(s->end->error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
}

TEST(StreamWriterReactorTest, AStaleLastMessageIsDroppedButTheStreamStillEnds) {
  auto s = std::make_shared<Stream::Shared>();
  Stream::Send(s, Progress(1), /*seq=*/5, /*coalescable=*/false);
  Stream::Send(s, Progress(2), /*seq=*/4, /*coalescable=*/false);  // older: dropped
  Stream::SendLastAndClose(s, Result(1), /*seq=*/5, grpc::Status::OK);
  ASSERT_EQ(s->queue.size(), 1u);
  EXPECT_EQ(s->queue[0].first.progress().step(), 1);
  ASSERT_TRUE(s->end.has_value());
  Stream::SendLastAndClose(s, Result(2), /*seq=*/6, grpc::Status::OK);  // after the end
  EXPECT_EQ(s->queue.size(), 1u);
}

}  // namespace
}  // namespace perfusion::server
