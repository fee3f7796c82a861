#include "vmreplica/status.h"

#include <gtest/gtest.h>

namespace vmreplica {
namespace {

Result<int> Half(int x) {
  if (x % 2 != 0) return Status::InvalidArgument("odd: " + std::to_string(x));
  return x / 2;
}

Result<int> Quarter(int x) {
  VMR_ASSIGN_OR_RETURN(int h, Half(x));
  return Half(h);
}

TEST(StatusTest, OkByDefaultAndCodesKeepTheirMessage) {
  EXPECT_TRUE(Status().ok());
  Status s = Status::FailedPrecondition("state 3");
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.code(), Code::kFailedPrecondition);
  EXPECT_EQ(s.ToString(), "FailedPrecondition: state 3");
  EXPECT_EQ(s.WithContext("failover").message(), "failover: state 3");
}

TEST(StatusTest, AssignOrReturnPropagatesTheFirstError) {
  EXPECT_EQ(*Quarter(8), 2);
  Result<int> r = Quarter(6);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().message(), "odd: 3");
}

}  // namespace
}  // namespace vmreplica
