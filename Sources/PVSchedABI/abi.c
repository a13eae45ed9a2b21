/* The ABI is header-only; this file makes the C target a module SwiftPM builds
 * and gets the header's static asserts checked by every host build. */
#include "pvsched_abi.h"
#include "pvsched_boot.h"
