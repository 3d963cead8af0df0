// Stand-in for the CUDA toolkit header of this name when csrc/ is built for host emulation.
#pragma once
#include "rank1_cuda_emulation.h"
