// Folder creation shared by the engine's tools. Header-only, like tool_args.h: every .cc in
// worker/tools/ is a tool of its own.
#ifndef PERFUSION_WORKER_TOOLS_TOOL_FILES_H_
#define PERFUSION_WORKER_TOOLS_TOOL_FILES_H_

#include <filesystem>
#include <stdexcept>
#include <string>
#include <system_error>

namespace perfusion {

// Creates `dir` and any missing parents, as `mkdir -p` does. Throws std::runtime_error naming the
// folder when it cannot be made (a tool then stops before any work, not at its first checkpoint).
inline void MakeDirs(const std::string& dir) {
  if (dir.empty()) return;
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec || !std::filesystem::is_directory(dir)) {
    throw std::runtime_error("cannot create folder " + dir + (ec ? ": " + ec.message() : ": a file is in the way"));
  }
}

// Whether `path` names anything (file or folder); errors such as a missing parent read as no.
inline bool Exists(const std::string& path) {
  std::error_code ec;
  return std::filesystem::exists(path, ec);
}

// MakeDirs for the folder that will hold `file`.
inline void MakeParentDirs(const std::string& file) {
  MakeDirs(std::filesystem::path(file).parent_path().string());
}

}  // namespace perfusion

#endif  // PERFUSION_WORKER_TOOLS_TOOL_FILES_H_
