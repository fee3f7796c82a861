// Errors as values. A Status carries a code that tells the caller how to
// react, and a message for the human. Result<T> is a value or a Status.
//
// Codes map onto the WMI return codes (32768..32779) at the service boundary
// only (see model/return_code.h); inside the modules they stay abstract.
#pragma once

#include <cassert>
#include <optional>
#include <string>
#include <utility>
#include <variant>

namespace vmreplica {

enum class Code {
  kOk = 0,
  kInvalidArgument,    // the caller's input is wrong: fix the input (32773)
  kFailedPrecondition, // the object is in the wrong state for this (32775)
  kPermissionDenied,   // the caller is not allowed (32769)
  kNotFound,           // a named object or file does not exist (32779)
  kAlreadyExists,      // the object exists already (32773)
  kUnavailable,        // the peer or resource is unreachable: retry later (32777)
  kTimeout,            // gave up waiting (32772)
  kBusy,               // in use by someone else: retry later (32774)
  kNotSupported,       // not implemented or not possible here (32770)
  kCorruption,         // bytes from disk or network failed a check (32768)
  kIOError,            // the operating system refused an operation (32768)
  kCancelled,          // stopped on request (32768)
  kInternal,           // a bug or an unexpected library failure (32768)
};

const char* CodeName(Code code);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(Code code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() { return Status(); }
  static Status InvalidArgument(std::string m) { return {Code::kInvalidArgument, std::move(m)}; }
  static Status FailedPrecondition(std::string m) { return {Code::kFailedPrecondition, std::move(m)}; }
  static Status PermissionDenied(std::string m) { return {Code::kPermissionDenied, std::move(m)}; }
  static Status NotFound(std::string m) { return {Code::kNotFound, std::move(m)}; }
  static Status AlreadyExists(std::string m) { return {Code::kAlreadyExists, std::move(m)}; }
  static Status Unavailable(std::string m) { return {Code::kUnavailable, std::move(m)}; }
  static Status Timeout(std::string m) { return {Code::kTimeout, std::move(m)}; }
  static Status Busy(std::string m) { return {Code::kBusy, std::move(m)}; }
  static Status NotSupported(std::string m) { return {Code::kNotSupported, std::move(m)}; }
  static Status Corruption(std::string m) { return {Code::kCorruption, std::move(m)}; }
  static Status IOError(std::string m) { return {Code::kIOError, std::move(m)}; }
  static Status Cancelled(std::string m) { return {Code::kCancelled, std::move(m)}; }
  static Status Internal(std::string m) { return {Code::kInternal, std::move(m)}; }

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  const std::string& message() const { return message_; }
  // "InvalidArgument: message" (or "OK").
  std::string ToString() const;

  // Returns a copy with "context: " put before the message.
  Status WithContext(const std::string& context) const;

  // Explicitly drops an error that the caller decided not to act on.
  void IgnoreError() const {}

 private:
  Code code_ = Code::kOk;
  std::string message_;
};

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {  // NOLINT: implicit by design
    assert(!std::get<Status>(v_).ok() && "Result built from an OK status");
  }

  bool ok() const { return std::holds_alternative<T>(v_); }
  Status status() const { return ok() ? Status::Ok() : std::get<Status>(v_); }

  T& value() & { assert(ok()); return std::get<T>(v_); }
  const T& value() const& { assert(ok()); return std::get<T>(v_); }
  T&& value() && { assert(ok()); return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace vmreplica

#define VMR_CONCAT_INNER(a, b) a##b
#define VMR_CONCAT(a, b) VMR_CONCAT_INNER(a, b)

// Returns the status from the enclosing function when it is not OK.
#define VMR_RETURN_IF_ERROR(expr)                     \
  do {                                                \
    ::vmreplica::Status vmr_status_ = (expr);         \
    if (!vmr_status_.ok()) return vmr_status_;        \
  } while (0)

// VMR_ASSIGN_OR_RETURN(auto x, MakeX()): unwraps a Result or returns its status.
#define VMR_ASSIGN_OR_RETURN(lhs, expr) \
  VMR_ASSIGN_OR_RETURN_IMPL(VMR_CONCAT(vmr_result_, __LINE__), lhs, expr)
#define VMR_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                              \
  if (!tmp.ok()) return tmp.status();             \
  lhs = std::move(tmp).value()
