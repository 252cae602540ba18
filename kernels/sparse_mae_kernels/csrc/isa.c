/* Which vector path this build of the kernels took (what the compiler targeted), so the
 * Python side can check it against the CPU it runs on: bit 0 the AVX-512 path of
 * common.h, bit 1 AVX2 code generation, bit 2 FMA contraction. */
#include "common.h"

int sm_compiled_isa(void) {
  int isa = 0;
#ifdef HAVE_AVX512
  isa |= 1;
#endif
#ifdef __AVX2__
  isa |= 2;
#endif
#ifdef __FMA__
  isa |= 4;
#endif
  return isa;
}

/* floats per vector (VL of common.h): one register of the target, so the compiler never
 * splits a vector through the stack (16 on an AVX2 target was 1.5-5x slower) */
int sm_vector_lanes(void) { return VL; }
