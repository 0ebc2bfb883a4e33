// Argument checks that surface in Python as ValueError (std::invalid_argument) or TypeError.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace pg {

/// Raised for a wrong dtype; bindings translate it to Python's TypeError.
struct type_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {
inline void append(std::ostringstream&) {}
template <typename T, typename... Rest>
inline void append(std::ostringstream& os, const T& v, const Rest&... rest) {
  os << v;
  append(os, rest...);
}
}  // namespace detail

template <typename... Args>
inline std::string str_cat(const Args&... args) {
  std::ostringstream os;
  detail::append(os, args...);
  return os.str();
}

}  // namespace pg

/// PG_CHECK(cond, "message", value, ...) throws std::invalid_argument (Python ValueError).
#define PG_CHECK(cond, ...)                                               \
  do {                                                                    \
    if (!(cond)) throw std::invalid_argument(::pg::str_cat(__VA_ARGS__)); \
  } while (0)

/// PG_CHECK_TYPE(cond, ...) throws pg::type_error (Python TypeError).
#define PG_CHECK_TYPE(cond, ...)                                     \
  do {                                                               \
    if (!(cond)) throw ::pg::type_error(::pg::str_cat(__VA_ARGS__)); \
  } while (0)
