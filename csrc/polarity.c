/* polarity.c - per-cell angular histograms of cytoplasm area and spots (polarity.h). One pass over the
 * pixels and one over the spots, so that a field of hundreds of cells on a large image costs one atan2
 * per pixel, and DypFISH's rotation search (360 one-degree bins) costs no more than fixed sections. */
#include "polarity.h"

#include <math.h>
#include <string.h>

#define TWO_PI 6.283185307179586

/* The bin of the direction from (cy, cx) to (y, x), relative to origin. */
static inline int angular_bin(double y, double x, double cy, double cx, double origin, int bins)
{
    double relative = fmod(atan2(cy - y, x - cx) - origin, TWO_PI);
    if (relative < 0)
        relative += TWO_PI;
    int bin = (int)(relative * (bins / TWO_PI));
    return bin < bins ? bin : bins - 1; /* relative within an ulp of 2pi */
}

ds_status ds_polarity_histograms(int64_t *area, int64_t *spot_count, int32_t *cell_of_spot, int32_t *bin_of_pixel,
                                 int height, int width, const int32_t *cell_of_pixel, int n_cells,
                                 const double *centroids, const double *origins, int bins, const double *spots,
                                 int64_t n_spots)
{
    if (height < 1 || width < 1 || n_cells < 0 || bins < 1 || n_spots < 0)
        return ds_fail(DS_ERR_VALUE, "polarity: bad sizes (height %d, width %d, cells %d, bins %d, spots %lld)",
                       height, width, n_cells, bins, (long long)n_spots);
    for (int c = 0; c < n_cells; c++)
        if (!isfinite(centroids[2 * c]) || !isfinite(centroids[2 * c + 1]) || !isfinite(origins[c]))
            return ds_fail(DS_ERR_VALUE, "polarity: cell %d has a non-finite centroid or direction", c);
    memset(area, 0, sizeof(int64_t) * (size_t)n_cells * (size_t)bins);
    memset(spot_count, 0, sizeof(int64_t) * (size_t)n_cells * (size_t)bins);
    for (int y = 0; y < height; y++) {
        for (int x = 0; x < width; x++) {
            size_t at = (size_t)y * (size_t)width + (size_t)x;
            int32_t c = cell_of_pixel[at];
            if (c < -1 || c >= n_cells)
                return ds_fail(DS_ERR_VALUE, "polarity: pixel (%d, %d) names cell %d of %d", y, x, c, n_cells);
            int bin = -1;
            if (c >= 0) {
                bin = angular_bin(y, x, centroids[2 * c], centroids[2 * c + 1], origins[c], bins);
                area[(size_t)c * bins + bin]++;
            }
            if (bin_of_pixel)
                bin_of_pixel[at] = bin;
        }
    }
    for (int64_t s = 0; s < n_spots; s++) {
        double y = spots[2 * s], x = spots[2 * s + 1];
        cell_of_spot[s] = -1;
        if (!isfinite(y) || !isfinite(x))
            return ds_fail(DS_ERR_VALUE, "polarity: spot %lld has a non-finite coordinate", (long long)s);
        double row = floor(y + 0.5), column = floor(x + 0.5);
        if (row < 0 || column < 0 || row >= height || column >= width)
            continue;
        int32_t c = cell_of_pixel[(size_t)row * (size_t)width + (size_t)column];
        if (c < 0)
            continue;
        cell_of_spot[s] = c;
        spot_count[(size_t)c * bins + angular_bin(y, x, centroids[2 * c], centroids[2 * c + 1], origins[c], bins)]++;
    }
    return DS_OK;
}
