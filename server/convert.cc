#include "server/convert.h"

namespace perfusion::server {

google::protobuf::Timestamp ToProtoTime(absl::Time t) {
  google::protobuf::Timestamp p;
  if (t == absl::InfinitePast() || t == absl::InfiniteFuture()) return p;
  const int64_t us = absl::ToUnixMicros(t);
  int64_t sec = us / 1000000, rem = us % 1000000;
  if (rem < 0) {
    rem += 1000000;
    --sec;
  }
  p.set_seconds(sec);
  p.set_nanos(static_cast<int32_t>(rem * 1000));
  return p;
}

google::protobuf::Duration ToProtoDuration(absl::Duration d) {
  google::protobuf::Duration p;
  const int64_t ns = absl::ToInt64Nanoseconds(d);
  p.set_seconds(ns / 1000000000);
  p.set_nanos(static_cast<int32_t>(ns % 1000000000));
  return p;
}

absl::Duration FromProtoDuration(const google::protobuf::Duration& d) {
  return absl::Seconds(d.seconds()) + absl::Nanoseconds(d.nanos());
}

TrainingOptions FromProto(const v1::TrainingOptions& p) {
  TrainingOptions o;
  if (p.has_steps()) o.steps = p.steps();
  o.learning_rate = p.learning_rate();
  o.embedding_learning_rate = p.embedding_learning_rate();
  o.batch_size = p.batch_size();
  o.resolution = p.resolution();
  if (p.has_seed()) o.seed = p.seed();
  o.train_beta = p.train_beta();
  o.train_temperature = p.train_temperature();
  o.captions.assign(p.captions().begin(), p.captions().end());
  return o;
}

void ToProto(const TrainingOptions& o, v1::TrainingOptions* p) {
  if (o.steps) p->set_steps(*o.steps);
  p->set_learning_rate(o.learning_rate);
  p->set_embedding_learning_rate(o.embedding_learning_rate);
  p->set_batch_size(o.batch_size);
  p->set_resolution(o.resolution);
  if (o.seed) p->set_seed(*o.seed);
  p->set_train_beta(o.train_beta);
  p->set_train_temperature(o.train_temperature);
  for (const auto& c : o.captions) p->add_captions(c);
}

TrainingRequest FromProto(v1::CreateTrainingJobRequest&& p) {
  TrainingRequest r;
  r.concept_name = p.concept_name();
  r.superclass = p.superclass();
  r.images.reserve(p.images_size());
  for (auto& img : *p.mutable_images()) r.images.push_back(std::move(img));
  r.options = FromProto(p.options());
  r.request_id = p.request_id();
  r.priority = p.priority();
  r.labels = Labels(p.labels().begin(), p.labels().end());
  return r;
}

void ToProto(const JobView& v, v1::TrainingJob* p) {
  const JobRecord& j = v.job;
  p->set_id(j.id);
  p->set_concept_name(j.concept_name);
  p->set_superclass(j.superclass);
  ToProto(j.options, p->mutable_options());
  p->set_priority(j.priority);
  p->set_request_id(j.request_id);
  p->set_state(static_cast<v1::JobState>(static_cast<int>(j.state)));
  p->set_image_count(j.image_count);
  p->set_attempts(j.attempts);
  p->set_queue_position(v.queue_position);
  auto* prog = p->mutable_progress();
  prog->set_step(j.step);
  prog->set_total_steps(j.total_steps);
  prog->set_loss(j.loss);
  if (v.eta > absl::ZeroDuration()) *prog->mutable_eta() = ToProtoDuration(v.eta);
  p->set_concept_id(j.concept_id);
  p->set_error_code(j.error_code);
  p->set_error_message(j.error_message);
  for (const auto& [k, val] : j.labels) (*p->mutable_labels())[k] = val;
  *p->mutable_create_time() = ToProtoTime(j.create_time);
  if (j.start_time != absl::InfinitePast()) *p->mutable_start_time() = ToProtoTime(j.start_time);
  if (j.end_time != absl::InfinitePast()) *p->mutable_end_time() = ToProtoTime(j.end_time);
  *p->mutable_update_time() = ToProtoTime(j.update_time);
}

void ToProto(const JobView& v, v1::TrainingJobEvent* p) {
  const JobRecord& j = v.job;
  p->set_job_id(j.id);
  p->set_state(static_cast<v1::JobState>(static_cast<int>(j.state)));
  p->set_queue_position(v.queue_position);
  p->set_step(j.step);
  p->set_total_steps(j.total_steps);
  p->set_loss(j.loss);
  if (v.eta > absl::ZeroDuration()) *p->mutable_eta() = ToProtoDuration(v.eta);
  p->set_concept_id(j.concept_id);
  p->set_error_code(j.error_code);
  p->set_error_message(j.error_message);
  *p->mutable_time() = ToProtoTime(j.update_time);
  p->set_attempts(j.attempts);
}

void ToProto(const ConceptRecord& c, v1::Concept* p) {
  p->set_id(c.id);
  p->set_name(c.name);
  p->set_version(c.version);
  p->set_superclass(c.superclass);
  p->set_base_model_id(c.base_model_id);
  p->set_digest(c.digest);
  p->set_size_bytes(c.size_bytes);
  p->set_format_version(c.format_version);
  p->set_dtype(c.dtype);
  for (const auto& [k, v] : c.labels) (*p->mutable_labels())[k] = v;
  p->set_source_job_id(c.source_job_id);
  *p->mutable_create_time() = ToProtoTime(c.create_time);
}

GenerationRequest FromProto(const v1::GenerateRequest& p) {
  GenerationRequest r;
  r.prompt = p.prompt();
  r.negative_prompt = p.negative_prompt();
  for (const auto& c : p.concepts()) {
    ConceptStrength s;
    s.name = c.name();
    if (c.has_beta()) s.beta = c.beta();
    if (c.has_tau()) s.tau = c.tau();
    s.key_lock = static_cast<KeyLock>(c.key_lock());
    r.concepts.push_back(std::move(s));
  }
  if (p.has_seed()) r.seed = p.seed();
  if (p.has_steps()) r.steps = p.steps();
  if (p.has_guidance_scale()) r.guidance_scale = p.guidance_scale();
  if (p.has_guidance_rescale()) r.guidance_rescale = p.guidance_rescale();
  if (p.has_width()) r.width = p.width();
  if (p.has_height()) r.height = p.height();
  if (p.has_num_images()) r.num_images = p.num_images();
  r.sampler = p.sampler();
  if (p.has_beta()) r.beta = p.beta();
  if (p.has_tau()) r.tau = p.tau();
  r.key_lock = static_cast<KeyLock>(p.key_lock());
  for (const auto& g : p.regions()) r.regions.push_back({g.prompt(), g.x0(), g.y0(), g.x1(), g.y1()});
  return r;
}

void ToProto(const GenerationRequest& r, v1::GenerateRequest* p) {
  p->set_prompt(r.prompt);
  p->set_negative_prompt(r.negative_prompt);
  for (const auto& s : r.concepts) {
    auto* c = p->add_concepts();
    c->set_name(s.name);
    if (s.beta) c->set_beta(*s.beta);
    if (s.tau) c->set_tau(*s.tau);
    c->set_key_lock(static_cast<v1::KeyLockMode>(s.key_lock));
  }
  if (r.seed) p->set_seed(*r.seed);
  if (r.steps) p->set_steps(*r.steps);
  if (r.guidance_scale) p->set_guidance_scale(*r.guidance_scale);
  if (r.guidance_rescale) p->set_guidance_rescale(*r.guidance_rescale);
  if (r.width) p->set_width(*r.width);
  if (r.height) p->set_height(*r.height);
  if (r.num_images) p->set_num_images(*r.num_images);
  p->set_sampler(r.sampler);
  if (r.beta) p->set_beta(*r.beta);
  if (r.tau) p->set_tau(*r.tau);
  p->set_key_lock(static_cast<v1::KeyLockMode>(r.key_lock));
  for (const auto& g : r.regions) {
    auto* q = p->add_regions();
    q->set_prompt(g.prompt);
    q->set_x0(g.x0);
    q->set_y0(g.y0);
    q->set_x1(g.x1);
    q->set_y1(g.y1);
  }
}

void ToProto(const WorkConcept& c, v1::WorkConcept* p) {
  p->set_reference(c.reference);
  p->set_concept_id(c.concept_id);
  p->set_name(c.name);
  p->set_version(c.version);
  p->set_superclass(c.superclass);
  p->set_digest(c.digest);
  p->set_size_bytes(c.size_bytes);
  p->set_beta(c.beta);
  p->set_tau(c.tau);
  p->set_key_lock(static_cast<v1::KeyLockMode>(c.key_lock));
}

void ToProto(const GenerationResult& r, v1::GenerateResponse* p) {
  for (const auto& img : r.images) {
    auto* i = p->add_images();
    i->set_png(img.png);
    i->set_seed(img.seed);
    i->set_width(img.width);
    i->set_height(img.height);
  }
  for (const auto& c : r.concepts) {
    auto* rc = p->add_concepts();
    rc->set_reference(c.reference);
    rc->set_concept_id(c.concept_id);
    rc->set_name(c.name);
    rc->set_version(c.version);
  }
  *p->mutable_queue_duration() = ToProtoDuration(r.queue_duration);
  *p->mutable_compute_duration() = ToProtoDuration(r.compute_duration);
}

GeneratedImage FromProto(const v1::GeneratedImage& p) {
  GeneratedImage g;
  g.png = p.png();
  g.seed = p.seed();
  g.width = p.width();
  g.height = p.height();
  return g;
}

void ToProto(const WorkItem& w, v1::LeaseWorkResponse* p) {
  if (w.retry_after > absl::ZeroDuration()) {
    *p->mutable_retry_after() = ToProtoDuration(w.retry_after);
  }
  if (w.lease_id.empty()) return;
  p->set_lease_id(w.lease_id);
  *p->mutable_lease_deadline() = ToProtoTime(w.lease_deadline);
  if (w.training) {
    const JobRecord& j = w.training->job;
    auto* t = p->mutable_training();
    t->set_job_id(j.id);
    t->set_tenant(j.tenant);
    t->set_concept_name(j.concept_name);
    t->set_superclass(j.superclass);
    ToProto(j.options, t->mutable_options());
    for (const auto& img : w.training->images) t->add_images(img);
    t->set_attempt(j.attempts);
  } else if (w.generation) {
    auto* g = p->mutable_generation();
    g->set_generation_id(w.generation->id);
    g->set_tenant(w.generation->tenant);
    ToProto(w.generation->spec.request, g->mutable_request());
    g->mutable_request()->clear_concepts();  // resolved per concept below
    for (const auto& c : w.generation->spec.concepts) ToProto(c, g->add_concepts());
    *g->mutable_deadline() = ToProtoTime(w.generation->deadline);
  }
}

}  // namespace perfusion::server
