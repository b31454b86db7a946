"""Pure data and logic: ids, piece math, the Vortex codec. No I/O, no clock."""
