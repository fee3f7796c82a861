// Conversions between the API's protobuf messages and the model's structs.
// Numbers outside an enum's range become InvalidArgument naming the field;
// nothing here trusts a number it has not checked.
#pragma once

#include "protoconv/settings_convert.h"
#include "vmreplica/job.h"
#include "vmreplica/model/settings.h"
#include "vmreplica/security.h"
#include "vmreplica/status.h"
#include "vmreplica/types.pb.h"

namespace vmreplica::service {

Result<ServerSettings> FromProto(const v1::ServerSettings& p);
void ToProto(const ServerSettings& s, v1::ServerSettings* p);

AuthorizationEntry FromProto(const v1::AuthorizationEntry& p);
void ToProto(const AuthorizationEntry& e, v1::AuthorizationEntry* p);

inline Result<RelationshipSettings> FromProto(const v1::RelationshipSettings& p) {
  return RelationshipSettingsFromProto(p);
}
inline void ToProto(const RelationshipSettings& s, v1::RelationshipSettings* p) { RelationshipSettingsToProto(s, p); }

void ToProto(const JobRecord& j, int64_t now_ms, v1::Job* p);
void ToProto(const security::CertificateInfo& c, const std::string& role, v1::Certificate* p);

int64_t NowMs();

}  // namespace vmreplica::service
