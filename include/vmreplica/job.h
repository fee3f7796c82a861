// A job as the API shows it (CIM_ConcreteJob semantics). Every method that
// takes time answers 4096 (JobStarted) with one of these.
#pragma once

#include <cstdint>
#include <string>

#include "vmreplica/model/enums.h"

namespace vmreplica {

struct JobRecord {
  std::string id;                    // InstanceID: a random UUID string
  JobType type = JobType::kStateChange;
  JobState state = JobState::kNew;
  uint32_t percent_complete = 0;     // 0..100
  uint32_t error_code = 0;           // a ReturnCode number; 0 = success
  std::string error_description;
  bool cancellable = false;
  bool resumable = false;            // may be restarted after a daemon restart
  std::string target;                // what it acts on (VM name, host:port...)
  std::string parameters_json;       // the method's inputs, to resume
  std::string result_json;           // the method's outputs once Completed
  int64_t created_ms = 0;            // Unix epoch milliseconds
  int64_t started_ms = 0;            // 0 until Running
  int64_t finished_ms = 0;           // 0 until final
  int64_t time_before_removal_s = 300;  // kept this long after it ends
};

}  // namespace vmreplica
