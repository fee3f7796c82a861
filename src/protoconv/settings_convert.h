// RelationshipSettings <-> its protobuf message, shared by the control API
// (service) and the data plane (transfer), which do not link each other.
// A number outside an enum's range is InvalidArgument naming the field.
#pragma once

#include "vmreplica/model/settings.h"
#include "vmreplica/status.h"
#include "vmreplica/types.pb.h"

namespace vmreplica {

Result<RelationshipSettings> RelationshipSettingsFromProto(const v1::RelationshipSettings& p);
void RelationshipSettingsToProto(const RelationshipSettings& s, v1::RelationshipSettings* p);

}  // namespace vmreplica
