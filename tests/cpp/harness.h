// A tiny self-contained test harness (no downloads): CHECK records a failure and continues,
// TEST registers a function, main() in each test file calls run_all(). Independent of NDEBUG, so
// the tests also check in Release builds.
#pragma once

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace harness {

struct Case {
  const char* name;
  std::function<void()> fn;
};
inline std::vector<Case>& cases() {
  static std::vector<Case> v;
  return v;
}
inline int& failures() {
  static int f = 0;
  return f;
}
struct Register {
  Register(const char* name, std::function<void()> fn) { cases().push_back({name, std::move(fn)}); }
};
inline int run_all() {
  for (auto& c : cases()) {
    const int before = failures();
    c.fn();
    std::printf("%s %s\n", failures() == before ? "[ OK ]" : "[FAIL]", c.name);
  }
  std::printf("%d failure(s)\n", failures());
  return failures() == 0 ? 0 : 1;
}

}  // namespace harness

#define TEST(name)                                                  \
  static void name();                                               \
  static harness::Register name##_reg(#name, name);                 \
  static void name()

#define CHECK(cond)                                                                   \
  do {                                                                                \
    if (!(cond)) {                                                                    \
      ++harness::failures();                                                          \
      std::printf("  %s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond);          \
    }                                                                                 \
  } while (0)

#define CHECK_EQ(a, b)                                                                      \
  do {                                                                                      \
    const auto va_ = (a);                                                                   \
    const auto vb_ = (b);                                                                   \
    if (!(va_ == vb_)) {                                                                    \
      ++harness::failures();                                                                \
      std::printf("  %s:%d: CHECK_EQ(%s, %s) failed: %s vs %s\n", __FILE__, __LINE__, #a, #b, \
                  std::to_string(va_).c_str(), std::to_string(vb_).c_str());                \
    }                                                                                       \
  } while (0)

#define CHECK_THROWS(expr, ExcType, substring)                                                \
  do {                                                                                        \
    bool thrown_ = false;                                                                     \
    try {                                                                                     \
      expr;                                                                                   \
    } catch (const ExcType& e_) {                                                             \
      thrown_ = true;                                                                         \
      if (std::string(e_.what()).find(substring) == std::string::npos) {                      \
        ++harness::failures();                                                                \
        std::printf("  %s:%d: message '%s' lacks '%s'\n", __FILE__, __LINE__, e_.what(),      \
                    substring);                                                               \
      }                                                                                       \
    }                                                                                         \
    if (!thrown_) {                                                                           \
      ++harness::failures();                                                                  \
      std::printf("  %s:%d: %s did not throw %s\n", __FILE__, __LINE__, #expr, #ExcType);     \
    }                                                                                         \
  } while (0)
