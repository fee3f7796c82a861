// Private to src/vm: libvirt connection, domain XML and QMP-through-libvirt
// helpers shared by the binding (vm_libvirt.cc) and the replica host's
// domains (libvirt_domain.cc).
#pragma once

#include <libvirt/libvirt-qemu.h>
#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>
#include <libxml/parser.h>
#include <libxml/xpath.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "vm/vm_internal.h"
#include "vmreplica/qmp.h"
#include "vmreplica/status.h"

namespace vmreplica::vm_internal {

// libvirt prints every error to stderr by default; we report them as Status.
inline void SilentErrorHandler(void*, virErrorPtr) {}

inline void InitLibvirt() {
  static std::once_flag once;
  std::call_once(once, [] {
    virInitialize();
    virSetErrorFunc(nullptr, SilentErrorHandler);
    xmlInitParser();
  });
}

inline std::string LastError() {
  virErrorPtr e = virGetLastError();
  return e != nullptr && e->message != nullptr ? std::string(e->message) : std::string("unknown libvirt error");
}

inline int LastErrorCode() {
  virErrorPtr e = virGetLastError();
  return e != nullptr ? e->code : 0;
}

struct ConnCloser {
  void operator()(virConnectPtr c) const { virConnectClose(c); }
};
struct DomainFreer {
  void operator()(virDomainPtr d) const { virDomainFree(d); }
};
using ConnPtr = std::unique_ptr<virConnect, ConnCloser>;
using DomainPtr = std::unique_ptr<virDomain, DomainFreer>;

inline Result<ConnPtr> Open(const std::string& uri) {
  InitLibvirt();
  virConnectPtr c = virConnectOpen(uri.c_str());
  if (c == nullptr) return Status::Unavailable("libvirt " + uri + ": " + LastError());
  return ConnPtr(c);
}

inline Result<DomainPtr> Lookup(virConnectPtr conn, const std::string& name) {
  virDomainPtr d = virDomainLookupByName(conn, name.c_str());
  if (d == nullptr) {
    if (LastErrorCode() == VIR_ERR_NO_DOMAIN) return Status::NotFound("libvirt has no domain \"" + name + "\"");
    return Status::Unavailable("libvirt lookup of " + name + ": " + LastError());
  }
  return DomainPtr(d);
}

inline Result<std::string> XmlDesc(virDomainPtr dom, unsigned int flags) {
  char* xml = virDomainGetXMLDesc(dom, flags);
  if (xml == nullptr) return Status::Unavailable("virDomainGetXMLDesc: " + LastError());
  std::string s(xml);
  free(xml);
  return s;
}

// A parsed domain XML with XPath helpers.
class DomainXml {
 public:
  static Result<std::unique_ptr<DomainXml>> Parse(const std::string& xml) {
    xmlDocPtr doc = xmlReadMemory(xml.data(), static_cast<int>(xml.size()), "domain.xml", nullptr,
                                  XML_PARSE_NONET | XML_PARSE_NOERROR | XML_PARSE_NOWARNING);
    if (doc == nullptr) return Status::Corruption("libvirt domain XML does not parse");
    xmlXPathContextPtr ctx = xmlXPathNewContext(doc);
    if (ctx == nullptr) {
      xmlFreeDoc(doc);
      return Status::Internal("xmlXPathNewContext failed");
    }
    return std::unique_ptr<DomainXml>(new DomainXml(doc, ctx));
  }
  ~DomainXml() {
    xmlXPathFreeContext(ctx_);
    xmlFreeDoc(doc_);
  }
  // Nodes matching `xpath`, relative to `at` (nullptr: the document).
  std::vector<xmlNodePtr> Nodes(const char* xpath, xmlNodePtr at = nullptr) {
    ctx_->node = at != nullptr ? at : xmlDocGetRootElement(doc_);
    std::vector<xmlNodePtr> out;
    xmlXPathObjectPtr r = xmlXPathEvalExpression(reinterpret_cast<const xmlChar*>(xpath), ctx_);
    if (r == nullptr) return out;
    if (r->nodesetval != nullptr) {
      for (int i = 0; i < r->nodesetval->nodeNr; ++i) out.push_back(r->nodesetval->nodeTab[i]);
    }
    xmlXPathFreeObject(r);
    return out;
  }
  // The string value of the first match ("" when none).
  std::string Text(const char* xpath, xmlNodePtr at = nullptr) {
    auto nodes = Nodes(xpath, at);
    if (nodes.empty()) return "";
    xmlChar* c = xmlNodeGetContent(nodes[0]);
    std::string s = c != nullptr ? reinterpret_cast<const char*>(c) : "";
    xmlFree(c);
    return s;
  }

  xmlDocPtr doc() { return doc_; }
  // The document as text (UTF-8, no XML declaration).
  std::string Dump() {
    xmlChar* buf = nullptr;
    int size = 0;
    xmlDocDumpFormatMemoryEnc(doc_, &buf, &size, "UTF-8", 1);
    std::string s = buf != nullptr ? std::string(reinterpret_cast<const char*>(buf), static_cast<size_t>(size)) : "";
    xmlFree(buf);
    const size_t decl = s.rfind("?>", 64);
    if (s.rfind("<?xml", 0) == 0 && decl != std::string::npos) s.erase(0, decl + 2);
    while (!s.empty() && (s.front() == '\n')) s.erase(0, 1);
    return s;
  }

 private:
  DomainXml(xmlDocPtr doc, xmlXPathContextPtr ctx) : doc_(doc), ctx_(ctx) {}
  xmlDocPtr doc_;
  xmlXPathContextPtr ctx_;
};

// The QMP channel through libvirt. Thread safety: libvirt connections and
// domain handles may be used from several threads.
class LibvirtChannel : public QmpChannel {
 public:
  LibvirtChannel(virDomainPtr dom, std::string export_dir, uid_t uid, gid_t gid)
      : dom_(dom), export_dir_(std::move(export_dir)), uid_(uid), gid_(gid) {}

  // `timeout` is not enforced: libvirt applies its own monitor timeout.
  Result<nlohmann::json> Execute(const std::string& command, const nlohmann::json& arguments,
                                 std::chrono::milliseconds) override {
    nlohmann::json msg = {{"execute", command}};
    if (!arguments.is_null()) msg["arguments"] = arguments;
    if (command == "blockdev-add") VMR_RETURN_IF_ERROR(HandOverFiles(arguments));
    char* reply = nullptr;
    if (virDomainQemuMonitorCommand(dom_, msg.dump().c_str(), &reply, VIR_DOMAIN_QEMU_MONITOR_COMMAND_DEFAULT) != 0) {
      return Status::Unavailable("QMP " + command + " through libvirt: " + LastError());
    }
    std::string text = reply != nullptr ? reply : "";
    free(reply);
    nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
    if (!j.is_object()) return Status::Corruption("QMP " + command + ": libvirt relayed a malformed reply");
    if (j.contains("return")) return j["return"];
    if (j.contains("error")) return QmpErrorStatus(command, j["error"]);
    return Status::Corruption("QMP " + command + ": reply without return or error");
  }

 private:
  // QEMU runs as another user under libvirt: image files the tracker made
  // in export_dir (overlays, created by qemu-img as us) are handed to that
  // user before QEMU opens them read-write.
  Status HandOverFiles(const nlohmann::json& args) {
    std::vector<const nlohmann::json*> todo = {&args};
    while (!todo.empty()) {
      const nlohmann::json* j = todo.back();
      todo.pop_back();
      if (!j->is_object()) continue;
      auto f = j->find("filename");
      if (f != j->end() && f->is_string()) {
        std::string path = f->get<std::string>();
        if (path.rfind(export_dir_ + "/", 0) == 0 && path.find("/../") == std::string::npos) {
          if (::chown(path.c_str(), uid_, gid_) != 0 && errno != ENOENT) {
            return Status::IOError("chown " + path + ": " + std::strerror(errno));
          }
        }
      }
      auto file = j->find("file");
      if (file != j->end()) todo.push_back(&*file);
    }
    return Status::Ok();
  }

  virDomainPtr const dom_;
  const std::string export_dir_;
  const uid_t uid_;
  const gid_t gid_;
};


}  // namespace vmreplica::vm_internal
