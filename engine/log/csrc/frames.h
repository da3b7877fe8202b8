/* A log frame's layout (docs/adr/0002-operation-log-format.md), shared by the scanner
 * (fastscan.c) and the read-ahead (readahead.c):
 *
 *     u32 length | u32 crc32(payload) | u32 crc32(first 8 bytes) | payload
 *
 * and the layout of frame hashes computed ahead: for each whole frame of a buffer from its
 * start, its offset (a native Py_ssize_t) and its BLAKE2b-256, DIGEST_ENTRY bytes per frame.
 */

#ifndef STRATA_FRAMES_H
#define STRATA_FRAMES_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

#include "blake2b.h"

#define FRAME_HEADER_SIZE 12
#define MAX_PAYLOAD (16u * 1024u * 1024u) /* engine.log.framing.MAX_PAYLOAD */
#define HASH_SIZE BLAKE2B_256_SIZE
#define DIGEST_ENTRY ((Py_ssize_t)sizeof(Py_ssize_t) + HASH_SIZE)

static inline uint32_t
be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* How many frames of ``buf`` have lengths that fit it and the limit; ``end`` just past them. */
static inline Py_ssize_t
count_frames(const uint8_t *buf, Py_ssize_t size, Py_ssize_t *end)
{
    Py_ssize_t count = 0, pos = 0;
    while (size - pos >= FRAME_HEADER_SIZE) {
        uint32_t length = be32(buf + pos);
        if (length > MAX_PAYLOAD || (Py_ssize_t)length > size - pos - FRAME_HEADER_SIZE) {
            break;
        }
        count += 1;
        pos += FRAME_HEADER_SIZE + (Py_ssize_t)length;
    }
    *end = pos;
    return count;
}

#endif
