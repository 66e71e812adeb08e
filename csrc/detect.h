/* detect.h - spot detection on one 2D plane (docs/reference_model.md section 4.1): the Icy-style
 * undecimated B3-spline wavelet detector the paper used downstream of the network, a peak
 * detector for enhanced images, subpixel refinement, and the merging of the per-plane spots of
 * a z-stack into molecules.
 *
 * Images are row-major float32 [height][width]. Coordinates are 0-based: y = row, x = column,
 * and (y, x) = (2, 3) is the centre of pixel [2][3].
 *
 * Ownership: every detector appends to a caller-owned ds_spot_list. Start from a zeroed list
 * (ds_spot_list spots = {0};), call detectors as often as wanted (a z-stack's planes can go
 * into one list), and release it with ds_spot_list_free(). On failure the list keeps what was
 * appended before the failing call, and stays valid to free. */
#ifndef DS_DETECT_H
#define DS_DETECT_H

#include <stddef.h>
#include "status.h"

#define DS_WAVELET_MAX_SCALE 5
#define DS_MAX_WINDOW_RADIUS 15

typedef struct {
    float z;         /* plane index: 0 from the 2D detectors; callers set it before ds_merge_plane_spots() */
    float y, x;      /* position in pixels, refined as the caller asked */
    float score;     /* detection image: the peak pixel's value (peak detector), the component's maximum (wavelet) */
    float intensity; /* the second image (raw) at the rounded position; the detection image when none is given */
    float size;      /* wavelet: component pixel count; peak: half-maximum area (see ds_detect_peaks) */
} ds_spot;

/* The Python binding hands spots over as float32 rows of this many columns. */
#define DS_SPOT_FIELDS 6
_Static_assert(sizeof(ds_spot) == DS_SPOT_FIELDS * sizeof(float), "ds_spot must be a plain row of floats");

typedef struct {
    ds_spot *items;
    size_t count, capacity;
} ds_spot_list;

void ds_spot_list_free(ds_spot_list *list);

typedef enum {
    DS_SUBPIXEL_NONE,     /* peak: the peak pixel; wavelet: the component's (unweighted) centroid, as Icy */
    DS_SUBPIXEL_CENTROID, /* intensity-weighted centroid in the window around the brightest pixel */
    DS_SUBPIXEL_GAUSSIAN  /* least-squares 2D Gaussian fit in that window; the centroid if the fit diverges */
} ds_subpixel_mode;

/* "none", "centroid" or "gaussian". */
ds_status ds_subpixel_mode_from_name(const char *name, ds_subpixel_mode *mode);

/* Refinement, background and half-maximum area all look at the (2 * window_radius + 1)^2 window
 * around the spot's brightest pixel (clipped at the image border); its background is the mean of
 * the window's outermost pixels. window_radius: 1..DS_MAX_WINDOW_RADIUS. */
typedef struct {
    ds_subpixel_mode mode;
    int window_radius;
} refine_params;

/* The a trous transform, scales 1..num_scales (num_scales in 1..DS_WAVELET_MAX_SCALE):
 * A_0 = image, A_k = B3 kernel (1,4,6,4,1)/16 with 2^(k-1)-1 zeros between taps applied along
 * columns and then rows, with symmetric mirror borders (x[-1-i] = x[i], the edge pixel repeated,
 * as Icy; NumPy's pad mode 'symmetric'); W_k = A_(k-1) - A_k. details: [num_scales][height][width],
 * W_1 first. Both sides must be at least the kernel support at the last scale, 2^(num_scales+1)+1. */
ds_status ds_wavelet_transform(int height, int width, const float *image, int num_scales, float *details);

/* Per enabled scale j with sensitivity s_j (higher finds more; Icy's default is 100):
 * thr_j = sqrt(2 ln(N / 4^j)) * mean|W_j - mean(W_j)| * 100 / s_j, N = height * width. A pixel is
 * a spot pixel where W_j >= thr_j and W_j > 0 at every enabled scale (Icy keeps the scales'
 * non-zero coefficients); each 8-connected component of spot pixels is one spot. */
typedef struct {
    int num_scales; /* enabled scales: 1..DS_WAVELET_MAX_SCALE of them, distinct, each in 1..5 */
    int scales[DS_WAVELET_MAX_SCALE];
    float sensitivities[DS_WAVELET_MAX_SCALE];
    refine_params refine;
} wavelet_params;

/* raw may be NULL. Spots are appended in raster order of their components' first pixel. */
ds_status ds_detect_wavelet(int height, int width, const float *image, const float *raw, const wavelet_params *params,
                            ds_spot_list *spots);

/* A peak is a pixel above `threshold` that is the maximum of the (2 * footprint_radius + 1)^2
 * square around it (among equal values the first in raster order wins, so a flat top gives one
 * peak). Peaks are then taken from the strongest down, and one within min_distance (Euclidean,
 * inclusive, as scikit-image's peak_local_max) of an already taken one is dropped; 0 keeps all.
 * size = the half-maximum area: pixels 8-connected to the peak, inside the window, at or above
 * background + (peak - background) / 2. */
typedef struct {
    float threshold;
    int footprint_radius; /* >= 1 */
    float min_distance;   /* >= 0 */
    refine_params refine;
} peak_params;

/* raw may be NULL. Spots are appended from the strongest down. */
ds_status ds_detect_peaks(int height, int width, const float *image, const float *raw, const peak_params *params,
                          ds_spot_list *spots);

/* A molecule seen in several planes: spots of adjacent planes (z differing by 1) within `radius`
 * pixels of each other in (y, x) are linked one-to-one, closest pairs first, into chains. Each
 * chain becomes one spot carrying its strongest member's z, y, x, score and intensity, and the
 * sum of its members' sizes. z must hold whole plane indices. Appends to merged in the order of
 * each chain's first member in `spots`. */
ds_status ds_merge_plane_spots(const ds_spot *spots, size_t count, float radius, ds_spot_list *merged);

#endif
