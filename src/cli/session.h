// One run of the client against vmreplicad: the connection, the global
// output options, and the handling every method answer shares.
//
// Every control method answers a MethodResult {return_value,
// error_description, job}:
//   0      success: the command prints what it got (a table, or nothing);
//   4096   a job started: with --async the job is printed and the command
//          ends; otherwise the session waits for it (WaitJob, one second at
//          a time, a progress bar on stderr when stderr is a terminal),
//          prints the final job and, for a Completed job, its result;
//   other  failure: "vmreplica: <Method> failed: <code> (<Name>): <text>"
//          on stderr, exit 1.
// A job that ends with an error code, or in a state other than Completed,
// is a failure the same way. gRPC errors are transport failures (exit 3):
// the proto promises that a method's own failure is always a MethodResult.
//
// --json prints, on stdout, every response message that makes up the
// command's answer as one JSON object per line (proto field names, every
// primitive field), followed, when a job was waited for, by the final
// WaitJob response. Nothing else goes to stdout in that mode.
//
// Not thread-safe: one session per command.
#pragma once

#include <grpcpp/client_context.h>
#include <grpcpp/support/status.h>

#include <algorithm>
#include <cassert>
#include <chrono>
#include <functional>
#include <memory>
#include <ostream>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "cli/connection.h"
#include "vmreplica/control.grpc.pb.h"

namespace vmreplica::cli {

// Exit codes of the command.
inline constexpr int kExitOk = 0;
inline constexpr int kExitFailed = 1;       // the method or its job failed
inline constexpr int kExitUsage = 2;        // bad command line
inline constexpr int kExitUnreachable = 3;  // vmreplicad could not be reached (or the transport failed)

struct GlobalOptions {
  ConnectionOptions connection;
  bool json = false;
  bool async = false;    // do not wait for jobs
  double timeout_s = 0;  // how long to wait for a job; 0 = no limit
};

// A typed handle on one RPC of the stub, with its name (see VMR_RPC).
template <typename Req, typename Resp>
struct Rpc {
  const char* name;
  grpc::Status (v1::ReplicationService::Stub::*method)(grpc::ClientContext*, const Req&, Resp*);
};

template <typename Req, typename Resp>
constexpr Rpc<Req, Resp> MakeRpc(const char* name,
                                 grpc::Status (v1::ReplicationService::Stub::*method)(grpc::ClientContext*, const Req&,
                                                                                      Resp*)) {
  return {name, method};
}

// VMR_RPC(GetJob): the RPC handle whose name is exactly the method's.
#define VMR_RPC(Method) ::vmreplica::cli::MakeRpc(#Method, &::vmreplica::v1::ReplicationService::Stub::Method)

class Session {
 public:
  // `progress`: draw the job progress bar on `err` (stderr is a terminal).
  Session(GlobalOptions options, std::ostream& out, std::ostream& err, bool progress);
  ~Session();

  const GlobalOptions& options() const { return options_; }
  bool json() const { return options_.json; }
  std::ostream& out() { return out_; }
  std::ostream& err() { return err_; }

  // The RPCs the running verb declared in the verb table; Call() asserts
  // that the verb stays within them (WaitJob is always allowed).
  void set_declared_rpcs(const std::vector<std::string>* rpcs) { declared_rpcs_ = rpcs; }

  // Sends one RPC. Returns kExitOk, or prints why and returns
  // kExitUnreachable (transport failure) or kExitFailed (the connection
  // options are unusable: unreadable PEM file...).
  template <typename Req, typename Resp>
  int Call(const Rpc<Req, Resp>& rpc, const Req& request, Resp* response, int64_t deadline_ms = 0) {
    assert(IsDeclared(rpc.name) && "the verb calls an RPC it does not declare in the verb table");
    v1::ReplicationService::Stub* stub = nullptr;
    if (int rc = GetStub(&stub); rc != kExitOk) return rc;
    grpc::ClientContext context;
    if (deadline_ms > 0)
      context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(deadline_ms));
    grpc::Status status = (stub->*rpc.method)(&context, request, response);
    return status.ok() ? kExitOk : TransportFailure(rpc.name, status);
  }

  // A whole method: Call, print the response (JSON mode), HandleResult.
  // `print` renders a successful (0) answer as text; it is not called in
  // JSON mode.
  template <typename Req, typename Resp>
  int Invoke(const Rpc<Req, Resp>& rpc, const Req& request,
             const std::type_identity_t<std::function<void(const Resp&)>>& print = nullptr) {
    Resp response;
    if (int rc = Call(rpc, request, &response); rc != kExitOk) return rc;
    if (json()) PrintJson(response);
    std::function<void()> print_ok;
    if (print) print_ok = [&] { print(response); };
    return HandleResult(rpc.name, response.result(), print_ok);
  }

  // Acts on a MethodResult as the header describes. `print_ok` may be empty.
  int HandleResult(std::string_view method, const v1::MethodResult& result, const std::function<void()>& print_ok);

  // Waits for job `id` to end (or for --timeout), then prints it. `method`
  // names the failure in messages; empty = the job type's name. Returns
  // kExitOk when the job Completed with error code 0.
  int WaitForJob(std::string_view method, const std::string& id);

  // The job as a property table; `with_result` adds the fields of
  // result_json of a Completed job as a second table.
  void PrintJob(const v1::Job& job, bool with_result);

  // One JSON line on stdout.
  void PrintJson(const google::protobuf::Message& message);

  // "vmreplica: <method> failed: <code> (<Name>): <description>"; returns kExitFailed.
  int Fail(std::string_view method, uint32_t code, std::string_view description);

  // "vmreplica: <message>"; returns `exit_code`.
  int Error(std::string_view message, int exit_code);

 private:
  int GetStub(v1::ReplicationService::Stub** stub);
  int TransportFailure(std::string_view method, const grpc::Status& status);
  bool IsDeclared(std::string_view rpc) const;
  void DrawProgress(std::string_view label, uint32_t percent);
  void ClearProgress();

  const GlobalOptions options_;
  std::ostream& out_;
  std::ostream& err_;
  const bool progress_;
  const std::vector<std::string>* declared_rpcs_ = nullptr;
  std::unique_ptr<v1::ReplicationService::Stub> stub_;
  size_t progress_width_ = 0;  // characters of the progress line on screen
};

}  // namespace vmreplica::cli
