/* detect.c - spot detection on one 2D plane (see detect.h): the a trous wavelet transform and the
 * Icy-style detector on it, the peak detector for enhanced images, subpixel refinement, and the
 * merging of a z-stack's per-plane spots into molecules.
 * A 2048x2048 plane has to go through in tens of milliseconds, so the wavelet transform streams
 * rows through small per-scale ring buffers (nothing image-sized is allocated), the row loops are
 * written for the compiler to vectorise, and connected components are built from row runs rather
 * than pixels. */
#include "detect.h"

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- growable arrays */

/* Doubles the capacity of a realloc'ed array; *grown receives the new block. */
static ds_status grow_array(void *items, size_t *capacity, size_t item_size, void **grown)
{
    size_t bigger = *capacity ? 2 * *capacity : 64;
    *grown = realloc(items, bigger * item_size);
    if (!*grown)
        return ds_fail(DS_ERR_NOMEM, "out of memory growing an array to %zu items of %zu bytes", bigger, item_size);
    *capacity = bigger;
    return DS_OK;
}

void ds_spot_list_free(ds_spot_list *list)
{
    free(list->items);
    list->items = NULL;
    list->count = list->capacity = 0;
}

static ds_status spot_list_push(ds_spot_list *list, ds_spot spot)
{
    if (list->count == list->capacity) {
        void *items;
        DS_TRY(grow_array(list->items, &list->capacity, sizeof *list->items, &items));
        list->items = items;
    }
    list->items[list->count++] = spot;
    return DS_OK;
}

/* ---------------------------------------------------------------- argument checks */

ds_status ds_subpixel_mode_from_name(const char *name, ds_subpixel_mode *mode)
{
    static const char *const names[] = {"none", "centroid", "gaussian"};
    for (int i = 0; i < (int)(sizeof names / sizeof names[0]); i++) {
        if (strcmp(name, names[i]) == 0) {
            *mode = (ds_subpixel_mode)i;
            return DS_OK;
        }
    }
    return ds_fail(DS_ERR_VALUE, "subpixel must be 'none', 'centroid' or 'gaussian', not '%s'", name);
}

static ds_status check_refine(const refine_params *params)
{
    if (params->mode != DS_SUBPIXEL_NONE && params->mode != DS_SUBPIXEL_CENTROID &&
        params->mode != DS_SUBPIXEL_GAUSSIAN)
        return ds_fail(DS_ERR_VALUE, "unknown subpixel mode %d", (int)params->mode);
    if (params->window_radius < 1 || params->window_radius > DS_MAX_WINDOW_RADIUS)
        return ds_fail(DS_ERR_VALUE, "window_radius must be in 1..%d, got %d", DS_MAX_WINDOW_RADIUS,
                       params->window_radius);
    return DS_OK;
}

static int is_finite_bits(float value)
{
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return (bits & 0x7f800000u) != 0x7f800000u;
}

/* Rows are checked with a branch-free loop so that the common all-finite case stays fast. */
static ds_status check_finite(int height, int width, const float *image, const char *what)
{
    for (int y = 0; y < height; y++) {
        const float *row = image + (size_t)y * width;
        int all_finite = 1;
        for (int x = 0; x < width; x++)
            all_finite &= is_finite_bits(row[x]);
        if (all_finite)
            continue;
        for (int x = 0; x < width; x++)
            if (!is_finite_bits(row[x]))
                return ds_fail(DS_ERR_VALUE, "%s has a NaN or infinite value at row %d, column %d", what, y, x);
    }
    return DS_OK;
}

static ds_status check_plane(int height, int width, const float *image, const float *raw)
{
    if (height < 1 || width < 1)
        return ds_fail(DS_ERR_VALUE, "image is empty (%d x %d)", height, width);
    DS_TRY(check_finite(height, width, image, "image"));
    if (raw)
        DS_TRY(check_finite(height, width, raw, "raw image"));
    return DS_OK;
}

/* ---------------------------------------------------------------- a trous wavelet transform */

/* The transform streams rows: A_k row y needs rows y - 2s..y + 2s of A_(k-1) (s = 2^(k-1)), so
 * each level keeps only the rows its successor still needs in a ring buffer, and the finest
 * levels run ahead of the coarse ones. Nothing image-sized is allocated, which matters as much
 * as the arithmetic: first-touching fresh pages costs more than filtering them. Each detail row
 * W_k goes to a consumer as soon as it exists. */

static const float B3_CENTER = 6.0f / 16, B3_NEAR = 4.0f / 16, B3_FAR = 1.0f / 16;

static int scale_step(int scale) { return 1 << (scale - 1); }

static int kernel_support(int scale) { return 4 * scale_step(scale) + 1; }

static ds_status check_wavelet_size(int height, int width, int max_scale)
{
    if (height < 1 || width < 1)
        return ds_fail(DS_ERR_VALUE, "image is empty (%d x %d)", height, width);
    int support = kernel_support(max_scale);
    if (height < support || width < support)
        return ds_fail(DS_ERR_VALUE, "image is %d x %d; wavelet scale %d needs both sides >= %d", height, width,
                       max_scale, support);
    return DS_OK;
}

#define SUM_LANES 8
#define SUM_BLOCK 4096

/* sum |v|: float partial sums in independent lanes let the compiler vectorise without
 * reassociating; blocks are short enough for float, and their totals add up in double. */
static double sum_abs(const float *values, size_t n)
{
    double total = 0;
    for (size_t start = 0; start < n; start += SUM_BLOCK) {
        size_t end = n - start < SUM_BLOCK ? n : start + SUM_BLOCK;
        float lanes[SUM_LANES] = {0};
        size_t i = start;
        for (; i + SUM_LANES <= end; i += SUM_LANES)
            for (int k = 0; k < SUM_LANES; k++)
                lanes[k] += fabsf(values[i + k]);
        for (; i < end; i++)
            lanes[0] += fabsf(values[i]);
        for (int k = 0; k < SUM_LANES; k++)
            total += lanes[k];
    }
    return total;
}

/* Symmetric mirror: index -1 reads 0, n reads n - 1 (one reflection suffices: n >= support). */
static int mirror_index(int i, int n) { return i < 0 ? -1 - i : i >= n ? 2 * n - 1 - i : i; }

/* Receives detail row y of scale `scale` (only for the scales the stream was asked for). */
typedef ds_status (*detail_consumer)(void *context, int scale, int y, const float *detail_row);

typedef struct {
    int height, width, max_scale;
    unsigned wanted_scales; /* bit k: hand W_k to the consumer */
    detail_consumer consume;
    void *context;
    const float *image;                            /* A_0 */
    float *ring[DS_WAVELET_MAX_SCALE];              /* ring[k]: recent rows of A_k, 1 <= k < max_scale */
    int ring_rows[DS_WAVELET_MAX_SCALE];
    int next_row[DS_WAVELET_MAX_SCALE + 1];        /* next row each level will produce */
    float *padded_row, *last_level_row, *detail_row; /* scratch rows */
    float *block;                                  /* the one allocation behind all of the above */
} atrous_stream;

static const float *smoothed_row(const atrous_stream *s, int level, int y)
{
    if (level == 0)
        return s->image + (size_t)y * s->width;
    return s->ring[level] + (size_t)(y % s->ring_rows[level]) * s->width;
}

static ds_status atrous_stream_init(atrous_stream *s, int height, int width, const float *image, int max_scale,
                                    unsigned wanted_scales, detail_consumer consume, void *context)
{
    *s = (atrous_stream){.height = height, .width = width, .max_scale = max_scale, .wanted_scales = wanted_scales,
                         .consume = consume, .context = context, .image = image};
    size_t rows = 3; /* last_level_row, detail_row, padded_row; the padding is added below */
    for (int level = 1; level < max_scale; level++) {
        /* the next level reads 4 * its step + 1 consecutive rows */
        s->ring_rows[level] = kernel_support(level + 1);
        rows += (size_t)s->ring_rows[level];
    }
    s->block = malloc((rows * (size_t)width + 4 * (size_t)scale_step(max_scale)) * sizeof(float));
    if (!s->block)
        return ds_fail(DS_ERR_NOMEM, "out of memory for the wavelet transform of a %d x %d image", height, width);
    float *next = s->block;
    for (int level = 1; level < max_scale; level++) {
        s->ring[level] = next;
        next += (size_t)s->ring_rows[level] * width;
    }
    s->last_level_row = next;
    s->detail_row = next + width;
    s->padded_row = next + 2 * (size_t)width;
    return DS_OK;
}

/* Produces the next row of A_level (and W_level), first producing the rows of A_(level-1) it needs. */
static ds_status atrous_stream_step(atrous_stream *s, int level)
{
    const int y = s->next_row[level], width = s->width, step = scale_step(level);
    const int last_needed = y + 2 * step < s->height ? y + 2 * step : s->height - 1;
    while (level > 1 && s->next_row[level - 1] <= last_needed)
        DS_TRY(atrous_stream_step(s, level - 1));

    const float *restrict center = smoothed_row(s, level - 1, y);
    const float *restrict near_up = smoothed_row(s, level - 1, mirror_index(y - step, s->height));
    const float *restrict near_down = smoothed_row(s, level - 1, mirror_index(y + step, s->height));
    const float *restrict far_up = smoothed_row(s, level - 1, mirror_index(y - 2 * step, s->height));
    const float *restrict far_down = smoothed_row(s, level - 1, mirror_index(y + 2 * step, s->height));
    float *restrict row = s->padded_row + 2 * step;
    for (int x = 0; x < width; x++)
        row[x] = B3_CENTER * center[x] + B3_NEAR * (near_up[x] + near_down[x]) + B3_FAR * (far_up[x] + far_down[x]);
    for (int i = 0; i < 2 * step; i++) {
        row[-1 - i] = row[i];
        row[width + i] = row[width - 1 - i];
    }
    float *restrict out = level < s->max_scale ? s->ring[level] + (size_t)(y % s->ring_rows[level]) * width
                                               : s->last_level_row;
    for (int x = 0; x < width; x++)
        out[x] = B3_CENTER * row[x] + B3_NEAR * (row[x - step] + row[x + step]) +
                 B3_FAR * (row[x - 2 * step] + row[x + 2 * step]);
    s->next_row[level]++;

    if (!(s->wanted_scales & (1u << level)))
        return DS_OK;
    float *restrict detail = s->detail_row;
    for (int x = 0; x < width; x++)
        detail[x] = center[x] - out[x];
    return s->consume(s->context, level, y, detail);
}

/* Streams the whole image through the consumer; W_k rows arrive in row order for each k, and
 * row y of a finer scale always before row y of a coarser one. */
static ds_status atrous_stream_run(int height, int width, const float *image, int max_scale, unsigned wanted_scales,
                                   detail_consumer consume, void *context)
{
    atrous_stream s;
    DS_TRY(atrous_stream_init(&s, height, width, image, max_scale, wanted_scales, consume, context));
    ds_status rc = DS_OK;
    for (int y = 0; y < height && rc == DS_OK; y++)
        rc = atrous_stream_step(&s, max_scale);
    free(s.block);
    return rc;
}

typedef struct {
    float *details;
    int height, width;
} detail_planes;

static ds_status store_detail_row(void *context, int scale, int y, const float *detail_row)
{
    const detail_planes *planes = context;
    float *plane_row = planes->details + ((size_t)(scale - 1) * planes->height + y) * planes->width;
    memcpy(plane_row, detail_row, (size_t)planes->width * sizeof(float));
    return DS_OK;
}

ds_status ds_wavelet_transform(int height, int width, const float *image, int num_scales, float *details)
{
    if (num_scales < 1 || num_scales > DS_WAVELET_MAX_SCALE)
        return ds_fail(DS_ERR_VALUE, "num_scales must be in 1..%d, got %d", DS_WAVELET_MAX_SCALE, num_scales);
    DS_TRY(check_wavelet_size(height, width, num_scales));
    DS_TRY(check_finite(height, width, image, "image"));
    detail_planes planes = {details, height, width};
    unsigned all_scales = (1u << (num_scales + 1)) - 2;
    return atrous_stream_run(height, width, image, num_scales, all_scales, store_detail_row, &planes);
}

/* ---------------------------------------------------------------- spot windows and refinement */

#define WINDOW_SIDE (2 * DS_MAX_WINDOW_RADIUS + 1)
#define WINDOW_PIXELS (WINDOW_SIDE * WINDOW_SIDE)

/* Pixels below background + this fraction of the peak height get no weight in the centroid:
 * otherwise the many noise pixels of the window pull it towards the window centre. */
#define CENTROID_CUT 0.2
#define FIT_MAX_ITERATIONS 50
#define FIT_CONVERGED_SHIFT 1e-3 /* pixels */
#define GAUSSIAN_HALF_MAX_AREA_PER_VARIANCE 4.3551721806072 /* 2 pi ln 2 */
/* The true centre of a spot lies within about a pixel of its brightest pixel; a fit that lands
 * further away has locked onto noise or a neighbour. */
#define FIT_MAX_SHIFT 1.5

/* The window around a spot's brightest pixel, copied out of the image. */
typedef struct {
    int top, left, rows, cols; /* clipped at the image border */
    int peak_row, peak_col;    /* the brightest pixel, in window coordinates */
    double background;         /* mean of the window's outermost pixels */
    double peak_height;        /* peak value - background */
    float values[WINDOW_PIXELS];
} spot_window;

static void load_window(spot_window *win, const float *image, int height, int width, int peak_y, int peak_x,
                        int radius)
{
    win->top = peak_y - radius > 0 ? peak_y - radius : 0;
    win->left = peak_x - radius > 0 ? peak_x - radius : 0;
    win->rows = (peak_y + radius < height ? peak_y + radius + 1 : height) - win->top;
    win->cols = (peak_x + radius < width ? peak_x + radius + 1 : width) - win->left;
    win->peak_row = peak_y - win->top;
    win->peak_col = peak_x - win->left;
    double border_sum = 0;
    int border_count = 0;
    for (int r = 0; r < win->rows; r++) {
        const float *src = image + (size_t)(win->top + r) * width + win->left;
        for (int c = 0; c < win->cols; c++) {
            float v = src[c];
            win->values[r * win->cols + c] = v;
            if (r == 0 || c == 0 || r == win->rows - 1 || c == win->cols - 1) {
                border_sum += v;
                border_count++;
            }
        }
    }
    win->background = border_sum / border_count;
    win->peak_height = win->values[win->peak_row * win->cols + win->peak_col] - win->background;
}

static int half_maximum_area(const spot_window *win)
{
    const double level = win->background + 0.5 * win->peak_height;
    unsigned char seen[WINDOW_PIXELS] = {0};
    int stack[WINDOW_PIXELS];
    int top = 0, area = 0;
    int start = win->peak_row * win->cols + win->peak_col;
    seen[start] = 1;
    stack[top++] = start;
    while (top > 0) {
        int index = stack[--top];
        area++;
        int r = index / win->cols, c = index % win->cols;
        for (int dr = -1; dr <= 1; dr++) {
            for (int dc = -1; dc <= 1; dc++) {
                int nr = r + dr, nc = c + dc;
                if (nr < 0 || nc < 0 || nr >= win->rows || nc >= win->cols)
                    continue;
                int neighbour = nr * win->cols + nc;
                if (!seen[neighbour] && win->values[neighbour] >= level) {
                    seen[neighbour] = 1;
                    stack[top++] = neighbour;
                }
            }
        }
    }
    return area;
}

/* In window coordinates; stays at the peak pixel when nothing is above the cut. */
static void weighted_centroid(const spot_window *win, double *y, double *x)
{
    const double cut = win->background + CENTROID_CUT * win->peak_height;
    double total = 0, sum_y = 0, sum_x = 0;
    for (int r = 0; r < win->rows; r++) {
        for (int c = 0; c < win->cols; c++) {
            double weight = win->values[r * win->cols + c] - cut;
            if (weight > 0) {
                total += weight;
                sum_y += weight * r;
                sum_x += weight * c;
            }
        }
    }
    *y = win->peak_row;
    *x = win->peak_col;
    if (total > 0) {
        *y = sum_y / total;
        *x = sum_x / total;
    }
}

enum { FIT_AMPLITUDE, FIT_Y, FIT_X, FIT_SIGMA, FIT_OFFSET, FIT_PARAMS };

/* Sum of squared residuals of offset + amplitude * exp(-d^2 / (2 sigma^2)); with the gradient
 * terms J^T J and J^T r when jtj is not NULL. The Gaussian factorises into a row and a column
 * term, which saves most of the exp() calls. */
static double gaussian_residuals(const spot_window *win, const double *p, double jtj[FIT_PARAMS][FIT_PARAMS],
                                 double jtr[FIT_PARAMS])
{
    const double inv_var = 1.0 / (p[FIT_SIGMA] * p[FIT_SIGMA]);
    double row_factor[WINDOW_SIDE], col_factor[WINDOW_SIDE];
    for (int r = 0; r < win->rows; r++)
        row_factor[r] = exp(-0.5 * (r - p[FIT_Y]) * (r - p[FIT_Y]) * inv_var);
    for (int c = 0; c < win->cols; c++)
        col_factor[c] = exp(-0.5 * (c - p[FIT_X]) * (c - p[FIT_X]) * inv_var);
    double cost = 0;
    if (jtj) {
        memset(jtj, 0, FIT_PARAMS * FIT_PARAMS * sizeof(double));
        memset(jtr, 0, FIT_PARAMS * sizeof(double));
    }
    for (int r = 0; r < win->rows; r++) {
        for (int c = 0; c < win->cols; c++) {
            double bump = row_factor[r] * col_factor[c];
            double residual = win->values[r * win->cols + c] - (p[FIT_OFFSET] + p[FIT_AMPLITUDE] * bump);
            cost += residual * residual;
            if (!jtj)
                continue;
            double dy = r - p[FIT_Y], dx = c - p[FIT_X], a_bump = p[FIT_AMPLITUDE] * bump;
            double grad[FIT_PARAMS] = {bump, a_bump * dy * inv_var, a_bump * dx * inv_var,
                                       a_bump * (dy * dy + dx * dx) * inv_var / p[FIT_SIGMA], 1.0};
            for (int i = 0; i < FIT_PARAMS; i++) {
                jtr[i] += grad[i] * residual;
                for (int j = 0; j <= i; j++)
                    jtj[i][j] += grad[i] * grad[j];
            }
        }
    }
    if (jtj)
        for (int i = 0; i < FIT_PARAMS; i++)
            for (int j = i + 1; j < FIT_PARAMS; j++)
                jtj[i][j] = jtj[j][i];
    return cost;
}

/* Solves a x = b for symmetric positive definite a (Cholesky, a overwritten); 0 if not definite. */
static int solve_spd(double a[FIT_PARAMS][FIT_PARAMS], const double b[FIT_PARAMS], double x[FIT_PARAMS])
{
    for (int j = 0; j < FIT_PARAMS; j++) {
        double diagonal = a[j][j];
        for (int k = 0; k < j; k++)
            diagonal -= a[j][k] * a[j][k];
        if (!(diagonal > 0))
            return 0;
        a[j][j] = sqrt(diagonal);
        for (int i = j + 1; i < FIT_PARAMS; i++) {
            double v = a[i][j];
            for (int k = 0; k < j; k++)
                v -= a[i][k] * a[j][k];
            a[i][j] = v / a[j][j];
        }
    }
    for (int i = 0; i < FIT_PARAMS; i++) {
        double v = b[i];
        for (int k = 0; k < i; k++)
            v -= a[i][k] * x[k];
        x[i] = v / a[i][i];
    }
    for (int i = FIT_PARAMS - 1; i >= 0; i--) {
        double v = x[i];
        for (int k = i + 1; k < FIT_PARAMS; k++)
            v -= a[k][i] * x[k];
        x[i] = v / a[i][i];
    }
    return 1;
}

/* Levenberg-Marquardt on amplitude, y, x, sigma and offset, from (*y, *x) and the half-maximum
 * width. Returns 1 and the fitted centre, or 0 (centre untouched) if the fit diverged. */
static int fit_gaussian(const spot_window *win, int radius, double *y, double *x)
{
    double sigma = sqrt(half_maximum_area(win) / GAUSSIAN_HALF_MAX_AREA_PER_VARIANCE);
    sigma = fmin(fmax(sigma, 0.5), (double)radius);
    double p[FIT_PARAMS] = {win->peak_height, *y, *x, sigma, win->background};
    double jtj[FIT_PARAMS][FIT_PARAMS], jtr[FIT_PARAMS];
    double cost = gaussian_residuals(win, p, jtj, jtr);
    double damping = 1e-3;
    for (int iteration = 0; iteration < FIT_MAX_ITERATIONS && damping < 1e10; iteration++) {
        double damped[FIT_PARAMS][FIT_PARAMS], step[FIT_PARAMS], trial[FIT_PARAMS];
        memcpy(damped, jtj, sizeof damped);
        for (int i = 0; i < FIT_PARAMS; i++)
            damped[i][i] *= 1.0 + damping;
        if (!solve_spd(damped, jtr, step)) {
            damping *= 10;
            continue;
        }
        for (int i = 0; i < FIT_PARAMS; i++)
            trial[i] = p[i] + step[i];
        double trial_cost = gaussian_residuals(win, trial, NULL, NULL);
        if (!(trial_cost < cost)) {
            damping *= 10;
            continue;
        }
        memcpy(p, trial, sizeof p);
        damping *= 0.1;
        if (fabs(step[FIT_Y]) < FIT_CONVERGED_SHIFT && fabs(step[FIT_X]) < FIT_CONVERGED_SHIFT)
            break;
        cost = gaussian_residuals(win, p, jtj, jtr);
    }
    double fitted_sigma = fabs(p[FIT_SIGMA]);
    int plausible = isfinite(p[FIT_Y]) && isfinite(p[FIT_X]) && p[FIT_AMPLITUDE] > 0 && fitted_sigma >= 0.25 &&
                    fitted_sigma <= 2.0 * radius && fabs(p[FIT_Y] - win->peak_row) <= FIT_MAX_SHIFT &&
                    fabs(p[FIT_X] - win->peak_col) <= FIT_MAX_SHIFT;
    if (!plausible)
        return 0;
    *y = p[FIT_Y];
    *x = p[FIT_X];
    return 1;
}

/* Image coordinates of the spot whose window this is, refined as asked. */
static void refine_position(const spot_window *win, const refine_params *params, double *y, double *x)
{
    double wy = win->peak_row, wx = win->peak_col;
    if (params->mode != DS_SUBPIXEL_NONE)
        weighted_centroid(win, &wy, &wx);
    if (params->mode == DS_SUBPIXEL_GAUSSIAN)
        fit_gaussian(win, params->window_radius, &wy, &wx);
    *y = win->top + wy;
    *x = win->left + wx;
}

static float sample_rounded(const float *image, int height, int width, double y, double x)
{
    long row = lround(y), col = lround(x);
    row = row < 0 ? 0 : row >= height ? height - 1 : row;
    col = col < 0 ? 0 : col >= width ? width - 1 : col;
    return image[(size_t)row * width + col];
}

/* ---------------------------------------------------------------- wavelet detector */

/* Two streaming passes over the transform: the first sums |W_j| for the thresholds, the second
 * builds the spot mask row by row and cuts it into runs for the connected components. Recomputing
 * the transform is cheaper than storing it (see the transform's comment).
 * The threshold's mean(W_j) is zero: the B3 kernel with symmetric borders preserves the image's
 * sum (it is a periodic convolution of the mirrored image), so every A_k has the image's mean and
 * mean|W_j - mean(W_j)| = mean|W_j|, which one pass gives. */

static ds_status check_wavelet_params(const wavelet_params *params, int *max_scale)
{
    if (params->num_scales < 1 || params->num_scales > DS_WAVELET_MAX_SCALE)
        return ds_fail(DS_ERR_VALUE, "between 1 and %d wavelet scales must be enabled, got %d", DS_WAVELET_MAX_SCALE,
                       params->num_scales);
    *max_scale = 0;
    for (int i = 0; i < params->num_scales; i++) {
        int scale = params->scales[i];
        float sensitivity = params->sensitivities[i];
        if (scale < 1 || scale > DS_WAVELET_MAX_SCALE)
            return ds_fail(DS_ERR_VALUE, "wavelet scale must be in 1..%d, got %d", DS_WAVELET_MAX_SCALE, scale);
        for (int j = 0; j < i; j++)
            if (params->scales[j] == scale)
                return ds_fail(DS_ERR_VALUE, "wavelet scale %d is given twice", scale);
        if (!(sensitivity > 0) || !isfinite(sensitivity))
            return ds_fail(DS_ERR_VALUE, "sensitivity of scale %d must be a positive number, got %g", scale,
                           (double)sensitivity);
        if (scale > *max_scale)
            *max_scale = scale;
    }
    return check_refine(&params->refine);
}

typedef struct {
    double abs_sum[DS_WAVELET_MAX_SCALE + 1]; /* indexed by scale */
    int width;
} detail_abs_sums;

static ds_status accumulate_abs_detail(void *context, int scale, int y, const float *detail_row)
{
    detail_abs_sums *sums = context;
    sums->abs_sum[scale] += sum_abs(detail_row, (size_t)sums->width);
    return DS_OK;
}

/* A horizontal run [x0, x1) of mask pixels on row y, a node of the union-find over runs. */
typedef struct {
    int y, x0, x1;
    size_t parent;    /* the root is the component's first run in raster order */
    size_t component; /* valid on roots */
} mask_run;

typedef struct {
    mask_run *items;
    size_t count, capacity;
    size_t above_begin, above_end; /* the runs of the last row added */
} mask_runs;

static ds_status mask_runs_push(mask_runs *runs, int y, int x0, int x1)
{
    if (runs->count == runs->capacity) {
        void *items;
        DS_TRY(grow_array(runs->items, &runs->capacity, sizeof *runs->items, &items));
        runs->items = items;
    }
    runs->items[runs->count] = (mask_run){y, x0, x1, runs->count, 0};
    runs->count++;
    return DS_OK;
}

static size_t find_root(mask_run *runs, size_t i)
{
    while (runs[i].parent != i) {
        runs[i].parent = runs[runs[i].parent].parent;
        i = runs[i].parent;
    }
    return i;
}

static void unite(mask_run *runs, size_t a, size_t b)
{
    a = find_root(runs, a);
    b = find_root(runs, b);
    if (a < b)
        runs[b].parent = a;
    else if (b < a)
        runs[a].parent = b;
}

/* Cuts mask row y (rows come in order) into runs, united with the 8-connected runs above. */
static ds_status add_mask_row(mask_runs *runs, int y, const unsigned char *row, int width)
{
    size_t row_begin = runs->count;
    int x = 0;
    while (x < width) {
        if (x + 8 <= width) { /* masks are mostly empty: skip eight zero bytes at a time */
            uint64_t word;
            memcpy(&word, row + x, sizeof word);
            if (word == 0) {
                x += 8;
                continue;
            }
        }
        if (!row[x]) {
            x++;
            continue;
        }
        int start = x;
        while (x < width && row[x])
            x++;
        DS_TRY(mask_runs_push(runs, y, start, x));
    }
    size_t above = runs->above_begin;
    for (size_t i = row_begin; i < runs->count; i++) {
        const mask_run *run = &runs->items[i];
        while (above < runs->above_end && runs->items[above].x1 < run->x0)
            above++;
        for (size_t j = above; j < runs->above_end && runs->items[j].x0 <= run->x1; j++)
            unite(runs->items, i, j);
    }
    runs->above_begin = row_begin;
    runs->above_end = runs->count;
    return DS_OK;
}

/* The second pass: the mask rows of the enabled scales meet in a ring of rows (finer scales run
 * ahead of coarser ones), and each row is complete once the coarsest enabled scale has seen it. */
typedef struct {
    int width, finest_scale, coarsest_scale;
    float lower[DS_WAVELET_MAX_SCALE + 1]; /* by scale: keep W_j >= lower[j] */
    unsigned char *mask_ring;
    int ring_rows;
    mask_runs runs;
} mask_builder;

static ds_status add_detail_to_mask(void *context, int scale, int y, const float *restrict detail_row)
{
    mask_builder *builder = context;
    unsigned char *restrict mask = builder->mask_ring + (size_t)(y % builder->ring_rows) * builder->width;
    const float lower = builder->lower[scale];
    if (scale == builder->finest_scale) {
        for (int x = 0; x < builder->width; x++)
            mask[x] = detail_row[x] >= lower;
    } else {
        for (int x = 0; x < builder->width; x++)
            mask[x] &= detail_row[x] >= lower;
    }
    if (scale < builder->coarsest_scale)
        return DS_OK;
    return add_mask_row(&builder->runs, y, mask, builder->width);
}

static ds_status wavelet_mask_runs(int height, int width, const float *image, const wavelet_params *params,
                                   int max_scale, mask_runs *runs)
{
    unsigned enabled = 0;
    int finest = DS_WAVELET_MAX_SCALE;
    for (int i = 0; i < params->num_scales; i++) {
        enabled |= 1u << params->scales[i];
        finest = params->scales[i] < finest ? params->scales[i] : finest;
    }
    detail_abs_sums sums = {.width = width};
    DS_TRY(atrous_stream_run(height, width, image, max_scale, enabled, accumulate_abs_detail, &sums));

    const double pixels = (double)height * width;
    /* finer scales run at most 2 * (2^max_scale - 1) rows ahead */
    mask_builder builder = {.width = width, .finest_scale = finest, .coarsest_scale = max_scale,
                            .ring_rows = 2 << max_scale};
    for (int i = 0; i < params->num_scales; i++) {
        int scale = params->scales[i];
        double universal = sqrt(2.0 * log(pixels / ldexp(1.0, 2 * scale)));
        double threshold = universal * (sums.abs_sum[scale] / pixels) * 100.0 / params->sensitivities[i];
        /* the smallest positive float makes one comparison test both W >= thr and W > 0 */
        builder.lower[scale] = threshold > FLT_TRUE_MIN ? (float)threshold : FLT_TRUE_MIN;
    }
    builder.mask_ring = malloc((size_t)builder.ring_rows * width);
    if (!builder.mask_ring)
        return ds_fail(DS_ERR_NOMEM, "out of memory for the wavelet spot mask");
    ds_status rc = atrous_stream_run(height, width, image, max_scale, enabled, add_detail_to_mask, &builder);
    free(builder.mask_ring);
    *runs = builder.runs;
    return rc;
}

typedef struct {
    double pixels, sum_y, sum_x;
    float best_value;
    int best_y, best_x;
} component_stats;

static ds_status components_to_spots(int height, int width, const float *image, const float *raw, mask_runs *runs,
                                     const refine_params *refine, ds_spot_list *spots)
{
    size_t num_components = 0;
    for (size_t i = 0; i < runs->count; i++) {
        size_t root = find_root(runs->items, i);
        runs->items[i].parent = root;
        if (root == i)
            runs->items[i].component = num_components++;
    }
    if (num_components == 0)
        return DS_OK;
    component_stats *stats = calloc(num_components, sizeof *stats);
    if (!stats)
        return ds_fail(DS_ERR_NOMEM, "out of memory for %zu components", num_components);
    for (size_t i = 0; i < runs->count; i++) {
        const mask_run *run = &runs->items[i];
        component_stats *s = &stats[runs->items[run->parent].component];
        double length = run->x1 - run->x0;
        int first_pixel = s->pixels == 0;
        s->pixels += length;
        s->sum_y += length * run->y;
        s->sum_x += length * (run->x0 + run->x1 - 1) / 2.0;
        const float *row = image + (size_t)run->y * width;
        for (int x = run->x0; x < run->x1; x++) {
            if (first_pixel || row[x] > s->best_value) {
                s->best_value = row[x];
                s->best_y = run->y;
                s->best_x = x;
                first_pixel = 0;
            }
        }
    }
    ds_status rc = DS_OK;
    const float *intensity_image = raw ? raw : image;
    for (size_t k = 0; k < num_components && rc == DS_OK; k++) {
        const component_stats *s = &stats[k];
        double y = s->sum_y / s->pixels, x = s->sum_x / s->pixels;
        if (refine->mode != DS_SUBPIXEL_NONE) {
            spot_window win;
            load_window(&win, image, height, width, s->best_y, s->best_x, refine->window_radius);
            refine_position(&win, refine, &y, &x);
        }
        ds_spot spot = {0, (float)y, (float)x, s->best_value, sample_rounded(intensity_image, height, width, y, x),
                        (float)s->pixels};
        rc = spot_list_push(spots, spot);
    }
    free(stats);
    return rc;
}

ds_status ds_detect_wavelet(int height, int width, const float *image, const float *raw, const wavelet_params *params,
                            ds_spot_list *spots)
{
    int max_scale = 0;
    DS_TRY(check_wavelet_params(params, &max_scale));
    DS_TRY(check_wavelet_size(height, width, max_scale));
    DS_TRY(check_plane(height, width, image, raw));
    mask_runs runs = {0};
    ds_status rc = wavelet_mask_runs(height, width, image, params, max_scale, &runs);
    if (rc == DS_OK)
        rc = components_to_spots(height, width, image, raw, &runs, &params->refine, spots);
    free(runs.items);
    return rc;
}

/* ---------------------------------------------------------------- peak detector */

typedef struct {
    float value;
    int y, x;
} peak_candidate;

typedef struct {
    peak_candidate *items;
    size_t count, capacity;
} candidate_list;

static ds_status candidate_list_push(candidate_list *list, peak_candidate candidate)
{
    if (list->count == list->capacity) {
        void *items;
        DS_TRY(grow_array(list->items, &list->capacity, sizeof *list->items, &items));
        list->items = items;
    }
    list->items[list->count++] = candidate;
    return DS_OK;
}

/* Strongest first; equal values in raster order, so the result does not depend on qsort. */
static int compare_candidates(const void *pa, const void *pb)
{
    const peak_candidate *a = pa, *b = pb;
    if (a->value != b->value)
        return a->value > b->value ? -1 : 1;
    if (a->y != b->y)
        return a->y < b->y ? -1 : 1;
    return (a->x > b->x) - (a->x < b->x);
}

/* Ties go to the first pixel in raster order, so a flat top yields a single maximum. */
static int is_local_maximum(const float *image, int height, int width, int y, int x, int radius)
{
    const float value = image[(size_t)y * width + x];
    int top = y - radius > 0 ? y - radius : 0, bottom = y + radius < height ? y + radius : height - 1;
    int left = x - radius > 0 ? x - radius : 0, right = x + radius < width ? x + radius : width - 1;
    for (int r = top; r <= bottom; r++) {
        const float *row = image + (size_t)r * width;
        for (int c = left; c <= right; c++) {
            if (row[c] > value || (row[c] == value && (r < y || (r == y && c < x))))
                return 0;
        }
    }
    return 1;
}

static ds_status check_peak_params(const peak_params *params)
{
    if (!isfinite(params->threshold))
        return ds_fail(DS_ERR_VALUE, "threshold must be a finite number, got %g", (double)params->threshold);
    if (params->footprint_radius < 1 || params->footprint_radius > DS_MAX_WINDOW_RADIUS)
        return ds_fail(DS_ERR_VALUE, "footprint_radius must be in 1..%d, got %d", DS_MAX_WINDOW_RADIUS,
                       params->footprint_radius);
    if (!(params->min_distance >= 0) || !isfinite(params->min_distance))
        return ds_fail(DS_ERR_VALUE, "min_distance must be a finite number >= 0, got %g",
                       (double)params->min_distance);
    return check_refine(&params->refine);
}

static void mark_disc(unsigned char *taken, int height, int width, int y, int x, double radius)
{
    int reach = radius < (double)height + width ? (int)radius : height + width;
    int top = y - reach > 0 ? y - reach : 0, bottom = y + reach < height ? y + reach : height - 1;
    int left = x - reach > 0 ? x - reach : 0, right = x + reach < width ? x + reach : width - 1;
    double radius2 = radius * radius;
    for (int r = top; r <= bottom; r++) {
        unsigned char *row = taken + (size_t)r * width;
        double dy2 = (double)(r - y) * (r - y);
        for (int c = left; c <= right; c++)
            if (dy2 + (double)(c - x) * (c - x) <= radius2)
                row[c] = 1;
    }
}

/* Drops, strongest first, candidates within min_distance of a kept one; compacts the list. */
static ds_status suppress_close_peaks(int height, int width, double min_distance, candidate_list *candidates)
{
    if (candidates->count < 2)
        return DS_OK;
    qsort(candidates->items, candidates->count, sizeof *candidates->items, compare_candidates);
    if (min_distance <= 0)
        return DS_OK;
    unsigned char *taken = calloc((size_t)height * width, 1);
    if (!taken)
        return ds_fail(DS_ERR_NOMEM, "out of memory for peak suppression on a %d x %d image", height, width);
    size_t kept = 0;
    for (size_t i = 0; i < candidates->count; i++) {
        peak_candidate c = candidates->items[i];
        if (taken[(size_t)c.y * width + c.x])
            continue;
        mark_disc(taken, height, width, c.y, c.x, min_distance);
        candidates->items[kept++] = c;
    }
    candidates->count = kept;
    free(taken);
    return DS_OK;
}

ds_status ds_detect_peaks(int height, int width, const float *image, const float *raw, const peak_params *params,
                          ds_spot_list *spots)
{
    DS_TRY(check_peak_params(params));
    DS_TRY(check_plane(height, width, image, raw));
    candidate_list candidates = {0};
    ds_status rc = DS_OK;
    for (int y = 0; y < height && rc == DS_OK; y++) {
        const float *row = image + (size_t)y * width;
        for (int x = 0; x < width && rc == DS_OK; x++) {
            if (row[x] > params->threshold && is_local_maximum(image, height, width, y, x, params->footprint_radius))
                rc = candidate_list_push(&candidates, (peak_candidate){row[x], y, x});
        }
    }
    if (rc == DS_OK)
        rc = suppress_close_peaks(height, width, params->min_distance, &candidates);
    const float *intensity_image = raw ? raw : image;
    for (size_t i = 0; i < candidates.count && rc == DS_OK; i++) {
        const peak_candidate *c = &candidates.items[i];
        spot_window win;
        load_window(&win, image, height, width, c->y, c->x, params->refine.window_radius);
        double y, x;
        refine_position(&win, &params->refine, &y, &x);
        ds_spot spot = {0, (float)y, (float)x, c->value, sample_rounded(intensity_image, height, width, y, x),
                        (float)half_maximum_area(&win)};
        rc = spot_list_push(spots, spot);
    }
    free(candidates.items);
    return rc;
}

/* ---------------------------------------------------------------- z-stack merge */

typedef struct {
    float z, y;
    size_t index;
} plane_key;

static int compare_plane_keys(const void *pa, const void *pb)
{
    const plane_key *a = pa, *b = pb;
    if (a->z != b->z)
        return a->z < b->z ? -1 : 1;
    if (a->y != b->y)
        return a->y < b->y ? -1 : 1;
    return (a->index > b->index) - (a->index < b->index);
}

typedef struct {
    double distance2;
    size_t lower, upper; /* spot indices in planes z and z + 1 */
} plane_link;

static int compare_links(const void *pa, const void *pb)
{
    const plane_link *a = pa, *b = pb;
    if (a->distance2 != b->distance2)
        return a->distance2 < b->distance2 ? -1 : 1;
    if (a->lower != b->lower)
        return a->lower < b->lower ? -1 : 1;
    return (a->upper > b->upper) - (a->upper < b->upper);
}

typedef struct {
    plane_link *items;
    size_t count, capacity;
} link_list;

static ds_status link_list_push(link_list *links, plane_link link)
{
    if (links->count == links->capacity) {
        void *items;
        DS_TRY(grow_array(links->items, &links->capacity, sizeof *links->items, &items));
        links->items = items;
    }
    links->items[links->count++] = link;
    return DS_OK;
}

/* Every pair of spots in adjacent planes within radius; keys sorted by (z, y). */
static ds_status find_plane_links(const ds_spot *spots, const plane_key *keys, size_t count, double radius,
                                  link_list *links)
{
    size_t plane_begin = 0;
    while (plane_begin < count) {
        size_t plane_end = plane_begin;
        while (plane_end < count && keys[plane_end].z == keys[plane_begin].z)
            plane_end++;
        size_t next_end = plane_end;
        while (next_end < count && keys[next_end].z == keys[plane_end].z)
            next_end++;
        if (plane_end < count && keys[plane_end].z == keys[plane_begin].z + 1) {
            size_t window = plane_end;
            for (size_t i = plane_begin; i < plane_end; i++) {
                const ds_spot *a = &spots[keys[i].index];
                while (window < next_end && keys[window].y < a->y - radius)
                    window++;
                for (size_t j = window; j < next_end && keys[j].y <= a->y + radius; j++) {
                    const ds_spot *b = &spots[keys[j].index];
                    double dy = (double)a->y - b->y, dx = (double)a->x - b->x, d2 = dy * dy + dx * dx;
                    if (d2 <= radius * radius)
                        DS_TRY(link_list_push(links, (plane_link){d2, keys[i].index, keys[j].index}));
                }
            }
        }
        plane_begin = plane_end;
    }
    return DS_OK;
}

ds_status ds_merge_plane_spots(const ds_spot *spots, size_t count, float radius, ds_spot_list *merged)
{
    if (!(radius >= 0) || !isfinite(radius))
        return ds_fail(DS_ERR_VALUE, "merge radius must be a finite number >= 0, got %g", (double)radius);
    for (size_t i = 0; i < count; i++) {
        const ds_spot *s = &spots[i];
        if (!isfinite(s->y) || !isfinite(s->x) || !isfinite(s->z) || s->z != floorf(s->z))
            return ds_fail(DS_ERR_VALUE, "spot %zu has a non-finite position or a fractional plane index", i);
    }
    if (count == 0)
        return DS_OK;
    plane_key *keys = malloc(count * sizeof *keys);
    size_t *next = malloc(count * sizeof *next), *previous = malloc(count * sizeof *previous);
    link_list links = {0};
    ds_status rc = DS_OK;
    if (!keys || !next || !previous) {
        rc = ds_fail(DS_ERR_NOMEM, "out of memory for merging %zu spots", count);
        goto done;
    }
    for (size_t i = 0; i < count; i++) {
        keys[i] = (plane_key){spots[i].z, spots[i].y, i};
        next[i] = previous[i] = SIZE_MAX;
    }
    qsort(keys, count, sizeof *keys, compare_plane_keys);
    rc = find_plane_links(spots, keys, count, radius, &links);
    if (rc != DS_OK)
        goto done;
    if (links.count) /* qsort must not see the NULL of an empty list */
        qsort(links.items, links.count, sizeof *links.items, compare_links);
    for (size_t k = 0; k < links.count; k++) {
        const plane_link *link = &links.items[k];
        if (next[link->lower] == SIZE_MAX && previous[link->upper] == SIZE_MAX) {
            next[link->lower] = link->upper;
            previous[link->upper] = link->lower;
        }
    }
    for (size_t head = 0; head < count && rc == DS_OK; head++) {
        if (previous[head] != SIZE_MAX)
            continue;
        size_t strongest = head;
        double total_size = 0;
        for (size_t i = head; i != SIZE_MAX; i = next[i]) {
            total_size += spots[i].size;
            if (spots[i].score > spots[strongest].score)
                strongest = i;
        }
        ds_spot molecule = spots[strongest];
        molecule.size = (float)total_size;
        rc = spot_list_push(merged, molecule);
    }
done:
    free(keys);
    free(next);
    free(previous);
    free(links.items);
    return rc;
}
