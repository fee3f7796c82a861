#include "cli/session.h"

#include <google/protobuf/util/json_util.h>

#include <cmath>

#include "cli/format.h"
#include "vmreplica/model/enums.h"

namespace vmreplica::cli {
namespace {

constexpr uint32_t kPollMs = 1000;
// Slack on top of the WaitJob timeout before the client gives up the call.
constexpr int64_t kWaitJobSlackMs = 30'000;

const char* GrpcCodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
      return "OK";
    case grpc::StatusCode::CANCELLED:
      return "CANCELLED";
    case grpc::StatusCode::UNKNOWN:
      return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND:
      return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS:
      return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED:
      return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED:
      return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE:
      return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED:
      return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL:
      return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE:
      return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS:
      return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED:
      return "UNAUTHENTICATED";
    default:
      return "UNKNOWN";
  }
}

std::string JobStateText(uint32_t state) { return NameOrNumber<JobState>(state); }

}  // namespace

Session::Session(GlobalOptions options, std::ostream& out, std::ostream& err, bool progress)
    : options_(std::move(options)), out_(out), err_(err), progress_(progress) {}

Session::~Session() = default;

bool Session::IsDeclared(std::string_view rpc) const {
  if (declared_rpcs_ == nullptr || rpc == "WaitJob") return true;
  return std::find(declared_rpcs_->begin(), declared_rpcs_->end(), rpc) != declared_rpcs_->end();
}

int Session::GetStub(v1::ReplicationService::Stub** stub) {
  if (stub_ == nullptr) {
    auto channel = OpenChannel(options_.connection);
    if (!channel.ok()) {
      return Error(channel.status().message(),
                   channel.status().code() == Code::kInvalidArgument ? kExitUsage : kExitFailed);
    }
    stub_ = v1::ReplicationService::NewStub(*channel);
  }
  *stub = stub_.get();
  return kExitOk;
}

int Session::TransportFailure(std::string_view method, const grpc::Status& status) {
  ClearProgress();
  const std::string target = TargetDescription(options_.connection);
  std::string detail = status.error_message().empty() ? GrpcCodeName(status.error_code()) : status.error_message();
  switch (status.error_code()) {
    case grpc::StatusCode::UNAVAILABLE:
    case grpc::StatusCode::DEADLINE_EXCEEDED:
    case grpc::StatusCode::UNAUTHENTICATED:
    case grpc::StatusCode::PERMISSION_DENIED:
      err_ << "vmreplica: cannot reach vmreplicad at " << target << ": " << detail << "\n";
      break;
    default:
      // The daemon answered, but not with a MethodResult: a version mismatch
      // (UNIMPLEMENTED) or a broken transport.
      err_ << "vmreplica: " << method << ": vmreplicad at " << target << " answered gRPC "
           << GrpcCodeName(status.error_code()) << ": " << detail << "\n";
      break;
  }
  return kExitUnreachable;
}

int Session::HandleResult(std::string_view method, const v1::MethodResult& result,
                          const std::function<void()>& print_ok) {
  switch (result.return_value()) {
    case Number(ReturnCode::kCompleted):
      if (!json() && print_ok) print_ok();
      return kExitOk;
    case Number(ReturnCode::kJobStarted):
      if (result.job().id().empty()) {
        return Fail(method, result.return_value(), "a job was started but the answer does not name it");
      }
      if (options_.async) {
        if (!json()) PrintJob(result.job(), /*with_result=*/false);
        return kExitOk;
      }
      return WaitForJob(method, result.job().id());
    default:
      return Fail(method, result.return_value(), result.error_description());
  }
}

int Session::WaitForJob(std::string_view method, const std::string& id) {
  using Clock = std::chrono::steady_clock;
  const auto start = Clock::now();
  const bool limited = options_.timeout_s > 0;
  const auto limit = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(options_.timeout_s));
  std::string name(method);
  v1::JobResponse last;
  bool timed_out = false;
  for (;;) {
    uint32_t wait_ms = kPollMs;
    if (limited) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(limit - (Clock::now() - start));
      wait_ms = static_cast<uint32_t>(std::clamp<int64_t>(left.count(), 0, kPollMs));
    }
    v1::WaitJobRequest request;
    request.set_id(id);
    request.set_timeout_ms(wait_ms);
    v1::JobResponse response;
    if (int rc = Call(VMR_RPC(WaitJob), request, &response, wait_ms + kWaitJobSlackMs); rc != kExitOk) return rc;
    if (response.result().return_value() != Number(ReturnCode::kCompleted)) {
      ClearProgress();
      if (json()) PrintJson(response);
      return Fail("WaitJob", response.result().return_value(), response.result().error_description());
    }
    last = std::move(response);
    if (name.empty()) name = NameOrNumber<JobType>(last.job().job_type());
    if (IsFinal(static_cast<JobState>(last.job().job_state()))) break;
    if (limited && Clock::now() - start >= limit) {
      timed_out = true;
      break;
    }
    DrawProgress(name, last.job().percent_complete());
  }
  ClearProgress();

  const v1::Job& job = last.job();
  const bool completed = job.job_state() == Number(JobState::kCompleted);
  if (json()) {
    PrintJson(last);
  } else {
    PrintJob(job, completed);
  }
  if (timed_out) {
    char waited[32];
    std::snprintf(waited, sizeof waited, "%g", options_.timeout_s);
    return Fail(name, Number(ReturnCode::kTimeout),
                "job " + id + " is still " + JobStateText(job.job_state()) + " (" +
                    std::to_string(job.percent_complete()) + "%) after " + waited +
                    " s; it goes on: vmreplica jobs wait " + id);
  }
  if (completed && job.error_code() == 0) return kExitOk;
  const uint32_t code = job.error_code() != 0 ? job.error_code() : Number(ReturnCode::kFailed);
  std::string description = job.error_description();
  if (description.empty()) description = "job " + id + " ended " + JobStateText(job.job_state());
  return Fail(name, code, description);
}

void Session::PrintJob(const v1::Job& job, bool with_result) {
  PropertyTable t;
  t.Add("InstanceID", job.id())
      .Add("JobType", NumberAndName<JobType>(job.job_type()))
      .Add("JobState", NumberAndName<JobState>(job.job_state()))
      .Add("PercentComplete", std::to_string(job.percent_complete()))
      .Add("ErrorCode", NumberAndName<ReturnCode>(job.error_code()))
      .Add("ErrorDescription", job.error_description())
      .Add("Target", job.target())
      .Add("Cancellable", std::string(BoolText(job.cancellable())))
      .Add("StartTime", FormatUnixMs(job.started_unix_ms() != 0 ? job.started_unix_ms() : job.created_unix_ms()))
      .Add("ElapsedTime", FormatElapsedMs(job.elapsed_ms()));
  out_ << t.Render();
  if (with_result && job.job_state() == Number(JobState::kCompleted) && !job.result_json().empty()) {
    PropertyTable r;
    for (auto& [key, value] : JsonObjectRows(job.result_json())) r.Add(key, value);
    out_ << "\n" << r.Render();
  }
}

void Session::PrintJson(const google::protobuf::Message& message) {
  google::protobuf::util::JsonPrintOptions options;
  options.always_print_primitive_fields = true;
  options.preserve_proto_field_names = true;
  std::string text;
  auto status = google::protobuf::util::MessageToJsonString(message, &text, options);
  if (!status.ok()) {
    err_ << "vmreplica: cannot render " << message.GetTypeName() << " as JSON: " << status.ToString() << "\n";
    return;
  }
  out_ << text << "\n";
  out_.flush();
}

int Session::Fail(std::string_view method, uint32_t code, std::string_view description) {
  ClearProgress();
  err_ << "vmreplica: " << method << " failed: " << NumberAndName<ReturnCode>(code) << ": " << description << "\n";
  return kExitFailed;
}

int Session::Error(std::string_view message, int exit_code) {
  ClearProgress();
  err_ << "vmreplica: " << message << "\n";
  return exit_code;
}

void Session::DrawProgress(std::string_view label, uint32_t percent) {
  if (!progress_) return;
  std::string line = std::string(label) + "  " + ProgressBar(percent);
  const size_t width = DisplayWidth(line);
  if (width < progress_width_) line.append(progress_width_ - width, ' ');
  err_ << '\r' << line << std::flush;
  progress_width_ = std::max(width, progress_width_);
}

void Session::ClearProgress() {
  if (progress_width_ == 0) return;
  err_ << '\r' << std::string(progress_width_, ' ') << '\r' << std::flush;
  progress_width_ = 0;
}

}  // namespace vmreplica::cli
