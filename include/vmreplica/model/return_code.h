// Maps internal Status codes onto the WMI method return codes. Used only at
// the service boundary (API answers, job ErrorCode).
#pragma once

#include "vmreplica/model/enums.h"
#include "vmreplica/status.h"

namespace vmreplica {

inline ReturnCode ToReturnCode(Code code) {
  switch (code) {
    case Code::kOk: return ReturnCode::kCompleted;
    case Code::kInvalidArgument: return ReturnCode::kInvalidParameter;
    case Code::kAlreadyExists: return ReturnCode::kInvalidParameter;
    case Code::kFailedPrecondition: return ReturnCode::kInvalidState;
    case Code::kPermissionDenied: return ReturnCode::kAccessDenied;
    case Code::kNotFound: return ReturnCode::kFileNotFound;
    case Code::kUnavailable: return ReturnCode::kSystemNotAvailable;
    case Code::kTimeout: return ReturnCode::kTimeout;
    case Code::kBusy: return ReturnCode::kSystemInUse;
    case Code::kNotSupported: return ReturnCode::kNotSupported;
    case Code::kCorruption:
    case Code::kIOError:
    case Code::kCancelled:
    case Code::kInternal: return ReturnCode::kFailed;
  }
  return ReturnCode::kFailed;
}

inline ReturnCode ToReturnCode(const Status& s) { return ToReturnCode(s.code()); }

}  // namespace vmreplica
