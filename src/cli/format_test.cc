#include "cli/format.h"

#include <gtest/gtest.h>

namespace vmreplica::cli {
namespace {

TEST(Table, ColumnsAlignOnTheWidestCellWithoutTrailingBlanks) {
  Table t({"VMName", "State", "Health"});
  t.AddRow({"web01", "3 (Replicating)", "Normal"});
  t.AddRow({"database-server", "7 (Suspended)", ""});
  EXPECT_EQ(t.Render(),
            "VMName           State            Health\n"
            "web01            3 (Replicating)  Normal\n"
            "database-server  7 (Suspended)\n");
}

TEST(Table, HeaderOnlyWhenThereAreNoRows) {
  Table t({"Id", "Type"});
  EXPECT_EQ(t.rows(), 0u);
  EXPECT_EQ(t.Render(), "Id  Type\n");
}

TEST(Table, ShortRowsArePaddedAndLongRowsCut) {
  Table t({"A", "B", "C"});
  t.AddRow({"1"});
  t.AddRow({"1", "2", "3", "4"});
  EXPECT_EQ(t.Render(), "A  B  C\n1\n1  2  3\n");
}

TEST(Table, Utf8CellsAreMeasuredInCodePointsNotBytes) {
  Table t({"Name", "X"});
  t.AddRow({"prüfung", "1"});  // 7 code points, 8 bytes
  t.AddRow({"abcdefg", "2"});
  EXPECT_EQ(t.Render(), "Name     X\nprüfung  1\nabcdefg  2\n");
  EXPECT_EQ(DisplayWidth("prüfung"), 7u);
}

TEST(PropertyTable, HasAPropertyValueHeader) {
  PropertyTable t;
  t.Add("RecoveryServerEnabled", "True").Add("HttpsPort", "443");
  EXPECT_EQ(t.Render(),
            "Property               Value\n"
            "RecoveryServerEnabled  True\n"
            "HttpsPort              443\n");
}

TEST(Enums, NumberAndNameUsesTheWmiNames) {
  EXPECT_EQ(NumberAndName<ReplicationState>(3), "3 (Replicating)");
  EXPECT_EQ(NumberAndName<AllowedAuthenticationType>(2), "2 (Certificate)");
  EXPECT_EQ(NumberAndName<ReturnCode>(32770), "32770 (NotSupported)");
  EXPECT_EQ(NumberAndName<ReplicationState>(99), "99 (Undefined)");
  EXPECT_EQ(NameOrNumber<JobState>(7), "Completed");
  EXPECT_EQ(NameOrNumber<JobType>(115), "TestConnection");
  EXPECT_EQ(NameOrNumber<JobType>(1), "1");
}

TEST(Format, Times) {
  EXPECT_EQ(FormatUnixSeconds(0), "-");
  EXPECT_EQ(FormatUnixSeconds(1748736000), "2025-06-01T00:00:00Z");
  EXPECT_EQ(FormatUnixMs(1748802600999), "2025-06-01T18:30:00Z");
  EXPECT_EQ(FormatUnixMs(0), "-");
  EXPECT_EQ(FormatHhMm(0), "00:00");
  EXPECT_EQ(FormatHhMm(540), "09:00");
  EXPECT_EQ(FormatHhMm(1110), "18:30");
  EXPECT_EQ(FormatTimeSpan(43200), "12:00:00");
  EXPECT_EQ(FormatTimeSpan(3661), "01:01:01");
  EXPECT_EQ(FormatTimeSpan(7 * 86400), "7.00:00:00");
}

TEST(Format, ElapsedAndBytes) {
  EXPECT_EQ(FormatElapsedMs(850), "850ms");
  EXPECT_EQ(FormatElapsedMs(12345), "12.3s");
  EXPECT_EQ(FormatElapsedMs(307000), "5m07s");
  EXPECT_EQ(FormatElapsedMs(7380000), "2h03m");
  EXPECT_EQ(FormatElapsedMs(-5), "0ms");
  EXPECT_EQ(FormatBytes(512), "512 B");
  EXPECT_EQ(FormatBytes(1536), "1.5 KiB");
  EXPECT_EQ(FormatBytes(20u << 20), "20.0 MiB");
}

TEST(Format, ProgressBar) {
  EXPECT_EQ(ProgressBar(0), "[..........]  0%");
  EXPECT_EQ(ProgressBar(50), "[#####.....]  50%");
  EXPECT_EQ(ProgressBar(100), "[##########]  100%");
  EXPECT_EQ(ProgressBar(250), "[##########]  100%");
  EXPECT_EQ(ProgressBar(50, 4), "[##..]  50%");
}

TEST(Format, Join) {
  EXPECT_EQ(Join({}), "");
  EXPECT_EQ(Join({"a"}), "a");
  EXPECT_EQ(Join({"a", "b"}, "+"), "a+b");
}

TEST(JsonObjectRows, FlattensInDocumentOrder) {
  auto rows =
      JsonObjectRows(R"({"reachable":true,"peer":{"host":"r1","port":443},"names":["a","b"],"rtt_ms":1.5,"note":null,)"
                     R"("hops":[{"n":1}]})");
  std::vector<std::pair<std::string, std::string>> want = {
      {"reachable", "True"}, {"peer.host", "r1"}, {"peer.port", "443"}, {"names", "a, b"},
      {"rtt_ms", "1.5"},     {"note", ""},        {"hops[0].n", "1"}};
  EXPECT_EQ(rows, want);
}

TEST(JsonObjectRows, TextThatIsNotAnObjectIsOneRow) {
  auto rows = JsonObjectRows("not json");
  ASSERT_EQ(rows.size(), 1u);
  EXPECT_EQ(rows[0].first, "Result");
  EXPECT_EQ(rows[0].second, "not json");
}

}  // namespace
}  // namespace vmreplica::cli
