/* One host directory listed and lstat'ed with the GIL released (the floppy plugin's scan).

   list_and_stat(path) reads the directory (readdir) and lstat's each entry relative to it
   (fstatat with AT_SYMLINK_NOFOLLOW), all without the GIL: tree.py calls it on a thread of
   its own for the directories next in the scan's queue while the main thread turns the
   previous ones into FAT entries, so the stat system calls (most of a big tree's start-up)
   overlap the Python work.  The results are what os.listdir and os.lstat would give: names
   decoded as os.fsdecode does, sorted by their bytes, and per entry its mode, owner, size
   and times (as os.stat_result's float st_ctime, st_atime, st_mtime: seconds + ns * 1e-9),
   or the errno of a failed lstat.  Optional: without a compiler tree.py uses os.listdir and
   os.lstat. */

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

static PyMethodDef methods[] = {
    {"list_and_stat", list_and_stat, METH_VARARGS,
     "list_and_stat(path) -> (names, modes, uids, sizes, ctimes, atimes, mtimes, errors), GIL released"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_scandir", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__scandir(void) {
    return PyModule_Create(&module);
}
