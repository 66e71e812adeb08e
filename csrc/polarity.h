/* polarity.h - the pixel and spot pass of the RNA polarity analysis (deepspot_napari/polarity.py, the
 * paper's section 4.5 with DypFISH's polarity index): for every cell, how many cytoplasm pixels and how
 * many spots fall in each angular bin around its nucleus centroid. Everything else (sections, relative
 * densities, the index and its bootstrap) is arithmetic on these counts, done in NumPy.
 *
 * Angles are counterclockwise as seen on screen (row 0 at the top): 0 points to +x (right), pi/2 up
 * (toward row 0). Bin b of cell c covers the angles [origin[c] + b * 2pi / bins, origin[c] + (b + 1) *
 * 2pi / bins) around the cell's centroid. Coordinates are 0-based pixel centres, (y, x). */
#ifndef DS_POLARITY_H
#define DS_POLARITY_H

#include <stdint.h>
#include "status.h"

/* cell_of_pixel: int32 [height][width], the cell index (0..n_cells-1) of each cytoplasm pixel, -1 elsewhere.
 * centroids: [n_cells][2] (y, x); origins: [n_cells] radians; spots: [n_spots][2] (y, x).
 * Outputs: area and spot_count [n_cells][bins] (zeroed here); cell_of_spot [n_spots]: the cell whose
 * cytoplasm holds the spot's pixel, -1 for none (outside the image included); bin_of_pixel (optional,
 * may be NULL): int32 [height][width], each cytoplasm pixel's bin, -1 elsewhere. */
ds_status ds_polarity_histograms(int64_t *area, int64_t *spot_count, int32_t *cell_of_spot, int32_t *bin_of_pixel,
                                 int height, int width, const int32_t *cell_of_pixel, int n_cells,
                                 const double *centroids, const double *origins, int bins, const double *spots,
                                 int64_t n_spots);

#endif
