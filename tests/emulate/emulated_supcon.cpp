// csrc/supcon.cu compiled as C++ for the CPU emulation (a .cu source would go to nvcc).
#include "supcon.cu"
