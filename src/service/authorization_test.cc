#include "service/authorization.h"

#include <gtest/gtest.h>

namespace vmreplica::service {
namespace {

std::vector<AuthorizationEntry> Entries() {
  return {{"*", "/srv/any", ""},
          {"*.lab.example", "/srv/lab", "lab"},
          {"*.eu.lab.example", "/srv/eu", "eu"},
          {"primary.lab.example", "/srv/primary", "lab"}};
}

TEST(AuthorizationTest, ExactNameBeatsEveryWildcard) {
  auto m = FindAuthorization(Entries(), {"primary.lab.example"});
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->replica_storage_location, "/srv/primary");
}

TEST(AuthorizationTest, LongerWildcardBeatsShorterAndStar) {
  auto m = FindAuthorization(Entries(), {"h1.eu.lab.example"});
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->replica_storage_location, "/srv/eu");
  m = FindAuthorization(Entries(), {"h2.lab.example"});
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->replica_storage_location, "/srv/lab");
}

TEST(AuthorizationTest, StarCatchesTheRestButNothingWithoutIt) {
  auto m = FindAuthorization(Entries(), {"other.example"});
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->replica_storage_location, "/srv/any");
  const auto all = Entries();
  std::vector<AuthorizationEntry> no_star(all.begin() + 1, all.end());
  EXPECT_FALSE(FindAuthorization(no_star, {"other.example"}).has_value());
  EXPECT_FALSE(FindAuthorization(no_star, {}).has_value());
}

TEST(AuthorizationTest, AnyOfTheCertificateNamesMayMatch) {
  std::vector<AuthorizationEntry> only_lab = {{"*.lab.example", "/srv/lab", ""}};
  auto m = FindAuthorization(only_lab, {"localhost", "127.0.0.1", "p.lab.example"});
  ASSERT_TRUE(m.has_value());
  EXPECT_EQ(m->allowed_primary_host_system, "*.lab.example");
}

}  // namespace
}  // namespace vmreplica::service
