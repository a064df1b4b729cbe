// Conversions between perfusion.v1 protos and the server's domain types (server/types.h,
// scheduler.h). Field by field, no validation (server/validation.h validates domain values).
#ifndef PERFUSION_SERVER_CONVERT_H_
#define PERFUSION_SERVER_CONVERT_H_

#include "perfusion/v1/concept.pb.h"
#include "perfusion/v1/generation.pb.h"
#include "perfusion/v1/training.pb.h"
#include "perfusion/v1/worker.pb.h"
#include "server/scheduler.h"
#include "server/types.h"

namespace perfusion::server {

google::protobuf::Timestamp ToProtoTime(absl::Time t);  // InfinitePast -> epoch 0 (unset)
google::protobuf::Duration ToProtoDuration(absl::Duration d);
absl::Duration FromProtoDuration(const google::protobuf::Duration& d);

TrainingOptions FromProto(const v1::TrainingOptions& p);
void ToProto(const TrainingOptions& o, v1::TrainingOptions* p);
// Moves the images out of `p`.
TrainingRequest FromProto(v1::CreateTrainingJobRequest&& p);
void ToProto(const JobView& v, v1::TrainingJob* p);
void ToProto(const JobView& v, v1::TrainingJobEvent* p);

void ToProto(const ConceptRecord& c, v1::Concept* p);

GenerationRequest FromProto(const v1::GenerateRequest& p);
void ToProto(const GenerationRequest& r, v1::GenerateRequest* p);
void ToProto(const WorkConcept& c, v1::WorkConcept* p);
void ToProto(const GenerationResult& r, v1::GenerateResponse* p);
GeneratedImage FromProto(const v1::GeneratedImage& p);

// A leased item for the worker.
void ToProto(const WorkItem& w, v1::LeaseWorkResponse* p);

}  // namespace perfusion::server

#endif  // PERFUSION_SERVER_CONVERT_H_
