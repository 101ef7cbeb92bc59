// nbdkit's plugin ABI, version 2. There is no library to link: nbdkit itself provides
// nbdkit_error, nbdkit_add_extent, ... when it loads the plugin.
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

// nbdkit_error and nbdkit_debug are printf-like, which Swift cannot call.
static inline void rm_nbdkit_error(const char *message) { nbdkit_error("%s", message); }
static inline void rm_nbdkit_debug(const char *message) { nbdkit_debug("%s", message); }
