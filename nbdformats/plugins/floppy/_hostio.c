/* What the floppy plugin does with host files without holding Python's GIL: a C extension.

   list_and_stat(path) reads the directory (readdir) and lstat's each entry relative to it
   (fstatat with AT_SYMLINK_NOFOLLOW), all without the GIL: tree.py calls it on a thread of
   its own for the directories next in the scan's queue while the main thread turns the
   previous ones into FAT entries, so the stat system calls (most of a big tree's start-up)
   overlap the Python work.  The results are what os.listdir and os.lstat would give: names
   decoded as os.fsdecode does, sorted by their bytes, and per entry its mode, owner, size
   and times (as os.stat_result's float st_ctime, st_atime, st_mtime: seconds + ns * 1e-9),
   or the errno of a failed lstat.

   read_files(reads) fills each (path, offset, buffer) of a request from its host file: open
   (O_NOFOLLOW), pread until the buffer is full, close, for every file of the request with
   the GIL released once.  Released and taken again around each of those system calls, the
   GIL changed hands three times per small file, and with several connections reading at
   once most of the time went to those hand-overs.

   Optional: without a compiler the plugin uses os.listdir, os.lstat, os.open and os.preadv. */

#define _GNU_SOURCE  /* qsort_r */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

struct entry {
    size_t name;  /* offset in the names arena */
    size_t length;
    struct stat st;
    int error;
};

struct listing {
    char *names;
    size_t names_used, names_size;
    struct entry *entries;
    size_t count, size;
};

static int by_name(const void *a, const void *b, void *names) {
    const struct entry *x = a, *y = b;
    return strcmp((const char *)names + x->name, (const char *)names + y->name);
}

static void release(struct listing *l) {
    free(l->names);
    free(l->entries);
}

/* 0, or an errno (the directory could not be read, or memory ran out). */
static int list_directory(const char *path, struct listing *l) {
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return errno;
    int dup_fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    DIR *dir = dup_fd < 0 ? NULL : fdopendir(dup_fd);
    if (dir == NULL) {
        int error = errno;
        if (dup_fd >= 0)
            close(dup_fd);
        close(fd);
        return error;
    }
    int error = 0;
    struct dirent *d;
    for (;;) {
        errno = 0;
        d = readdir(dir);
        if (d == NULL) {
            error = errno;
            break;
        }
        if (d->d_name[0] == '.' && (d->d_name[1] == 0 || (d->d_name[1] == '.' && d->d_name[2] == 0)))
            continue;
        size_t length = strlen(d->d_name);
        if (l->names_used + length + 1 > l->names_size) {
            size_t size = (l->names_size + length + 1) * 2;
            char *names = realloc(l->names, size);
            if (names == NULL) {
                error = ENOMEM;
                break;
            }
            l->names = names;
            l->names_size = size;
        }
        if (l->count == l->size) {
            size_t size = l->size ? l->size * 2 : 256;
            struct entry *entries = realloc(l->entries, size * sizeof *entries);
            if (entries == NULL) {
                error = ENOMEM;
                break;
            }
            l->entries = entries;
            l->size = size;
        }
        memcpy(l->names + l->names_used, d->d_name, length + 1);
        l->entries[l->count].name = l->names_used;
        l->entries[l->count].length = length;
        l->count++;
        l->names_used += length + 1;
    }
    closedir(dir);
    if (!error) {
        for (size_t i = 0; i < l->count; i++) {
            struct entry *e = &l->entries[i];
            e->error = fstatat(fd, l->names + e->name, &e->st, AT_SYMLINK_NOFOLLOW) ? errno : 0;
        }
        if (l->count)
            qsort_r(l->entries, l->count, sizeof *l->entries, by_name, l->names);
    }
    close(fd);
    return error;
}

/* As os.stat_result's float times (CPython's fill_time: sec + nsec * 1e-9), rounded as
   there: the product first (volatile: never fused into one multiply-add). */
static PyObject *seconds(struct timespec t) {
    volatile double fraction = (double)(unsigned long)t.tv_nsec * 1e-9;
    return PyFloat_FromDouble((double)t.tv_sec + fraction);
}

/* list_and_stat(path) -> (names, modes, uids, sizes, ctimes, atimes, mtimes, errors): lists,
   names sorted by their bytes; an entry whose lstat failed has its errno in errors (else 0)
   and zeros elsewhere.  Raises OSError if the directory cannot be read. */
static PyObject *list_and_stat(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *path;
    if (!PyArg_ParseTuple(args, "O&:list_and_stat", PyUnicode_FSConverter, &path))
        return NULL;
    struct listing l = {0};
    int error;
    Py_BEGIN_ALLOW_THREADS
    error = list_directory(PyBytes_AS_STRING(path), &l);
    Py_END_ALLOW_THREADS
    if (error) {
        release(&l);
        errno = error;
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path);
        Py_DECREF(path);
        return NULL;
    }
    Py_DECREF(path);
    PyObject *lists[8];
    for (int k = 0; k < 8; k++) {
        lists[k] = PyList_New((Py_ssize_t)l.count);
        if (lists[k] == NULL) {
            for (int j = 0; j < k; j++)
                Py_DECREF(lists[j]);
            release(&l);
            return NULL;
        }
    }
    for (size_t i = 0; i < l.count; i++) {
        struct entry *e = &l.entries[i];
        int ok = !e->error;
        PyObject *items[8] = {
            PyUnicode_DecodeFSDefaultAndSize(l.names + e->name, (Py_ssize_t)e->length),
            PyLong_FromUnsignedLong(ok ? (unsigned long)e->st.st_mode : 0),
            PyLong_FromUnsignedLong(ok ? (unsigned long)e->st.st_uid : 0),
            PyLong_FromLongLong(ok ? (long long)e->st.st_size : 0),
            ok ? seconds(e->st.st_ctim) : PyFloat_FromDouble(0),
            ok ? seconds(e->st.st_atim) : PyFloat_FromDouble(0),
            ok ? seconds(e->st.st_mtim) : PyFloat_FromDouble(0),
            PyLong_FromLong(e->error),
        };
        for (int k = 0; k < 8; k++) {
            if (items[k] == NULL) {
                for (int j = 0; j < 8; j++) {
                    Py_XDECREF(items[j]);
                    Py_DECREF(lists[j]);
                }
                release(&l);
                return NULL;
            }
        }
        for (int k = 0; k < 8; k++)
            PyList_SET_ITEM(lists[k], (Py_ssize_t)i, items[k]);
    }
    release(&l);
    PyObject *result = PyTuple_New(8);
    if (result == NULL) {
        for (int k = 0; k < 8; k++)
            Py_DECREF(lists[k]);
        return NULL;
    }
    for (int k = 0; k < 8; k++)
        PyTuple_SET_ITEM(result, k, lists[k]);
    return result;
}

/* read_files(reads) -> None, or (index, errno) of the first read that failed: errno 0 when
   the file ended before the buffer was full.  `reads` is a list of (path, offset, writable
   buffer); the other reads are still done. */
static PyObject *read_files(PyObject *Py_UNUSED(self), PyObject *args) {
    PyObject *reads;
    if (!PyArg_ParseTuple(args, "O!:read_files", &PyList_Type, &reads))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(reads);
    PyObject **paths = PyMem_Calloc((size_t)(count ? count : 1), sizeof *paths);
    long long *offsets = PyMem_Calloc((size_t)(count ? count : 1), sizeof *offsets);
    Py_buffer *buffers = PyMem_Calloc((size_t)(count ? count : 1), sizeof *buffers);
    int *errors = PyMem_Calloc((size_t)(count ? count : 1), sizeof *errors);
    Py_ssize_t prepared = 0;
    PyObject *result = NULL;
    if (paths == NULL || offsets == NULL || buffers == NULL || errors == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    for (; prepared < count; prepared++) {
        PyObject *item = PyList_GET_ITEM(reads, prepared), *path, *buffer;
        if (!PyArg_ParseTuple(item, "OLO:read_files", &path, &offsets[prepared], &buffer))
            goto out;
        if (offsets[prepared] < 0) {
            PyErr_SetString(PyExc_ValueError, "read_files: negative offset");
            goto out;
        }
        if (!PyUnicode_FSConverter(path, &paths[prepared]))
            goto out;
        if (PyObject_GetBuffer(buffer, &buffers[prepared], PyBUF_WRITABLE) < 0) {
            Py_CLEAR(paths[prepared]);
            goto out;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < count; i++) {
        int fd = open(PyBytes_AS_STRING(paths[i]), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        if (fd < 0) {
            errors[i] = errno ? errno : EIO;
            continue;
        }
        char *to = buffers[i].buf;
        size_t left = (size_t)buffers[i].len;
        off_t at = (off_t)offsets[i];
        while (left) {
            ssize_t n = pread(fd, to, left, at);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0) {
                errors[i] = n < 0 ? (errno ? errno : EIO) : -1;  /* -1: the file ended */
                break;
            }
            to += n;
            left -= (size_t)n;
            at += n;
        }
        close(fd);
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (errors[i]) {
            result = Py_BuildValue("(ni)", i, errors[i] < 0 ? 0 : errors[i]);
            goto out;
        }
    }
    Py_INCREF(result);
out:
    for (Py_ssize_t i = 0; i < prepared; i++) {
        Py_XDECREF(paths[i]);
        PyBuffer_Release(&buffers[i]);
    }
    PyMem_Free(paths);
    PyMem_Free(offsets);
    PyMem_Free(buffers);
    PyMem_Free(errors);
    return result;
}

static PyMethodDef methods[] = {
    {"list_and_stat", list_and_stat, METH_VARARGS,
     "list_and_stat(path) -> (names, modes, uids, sizes, ctimes, atimes, mtimes, errors), GIL released"},
    {"read_files", read_files, METH_VARARGS,
     "read_files([(path, offset, buffer), ...]) -> None or (index, errno), GIL released"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_hostio", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__hostio(void) {
    return PyModule_Create(&module);
}
