/* Sector encryption at OpenSSL's speed, with the GIL released.

   One call encrypts or decrypts a whole run of sectors in place: for each sector, the IV
   (plain, plain64 or ESSIV), then one XTS or CBC operation of OpenSSL's EVP interface on that
   sector.  The loop runs without the GIL, so other connections' threads (or another part of the
   same request) run Python meanwhile.

   libcrypto is opened at import with dlopen("libcrypto.so.3"): the build needs no OpenSSL
   headers, and the few EVP functions used are declared here as OpenSSL 3 defines them.  If the
   library or a cipher is missing, the import fails with ImportError and cipher.py uses its
   numpy implementation instead. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <stdint.h>
#include <string.h>

typedef struct evp_cipher_st EVP_CIPHER;
typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;

static struct {
    EVP_CIPHER *(*fetch)(void *libctx, const char *algorithm, const char *properties);
    EVP_CIPHER_CTX *(*ctx_new)(void);
    void (*ctx_free)(EVP_CIPHER_CTX *ctx);
    int (*init)(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *cipher, void *engine, const unsigned char *key,
                const unsigned char *iv, int enc);
    int (*update)(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl, const unsigned char *in, int inl);
    int (*set_padding)(EVP_CIPHER_CTX *ctx, int pad);
} ssl;

/* The ciphers, fetched once (a fetch takes a lock and a lookup: too slow per call).
   Indexed by mode and key length. */
enum { XTS, CBC, ECB, MODES };
static const char *const MODE_NAMES[MODES] = {"XTS", "CBC", "ECB"};
static EVP_CIPHER *ciphers[MODES][3];  /* AES key lengths 16, 24, 32 (XTS: its halves) */

enum { IV_PLAIN, IV_PLAIN64, IV_ESSIV };

static int key_index(Py_ssize_t key_length) {
    return key_length == 16 ? 0 : key_length == 24 ? 1 : key_length == 32 ? 2 : -1;
}

static const EVP_CIPHER *cipher_for(int mode, Py_ssize_t key_length) {
    int index = key_index(mode == XTS ? key_length / 2 : key_length);
    if (mode == XTS && key_length % 2)
        index = -1;
    return index < 0 ? NULL : ciphers[mode][index];
}

/* A context keyed for `cipher`, without padding; NULL if OpenSSL refuses. */
static EVP_CIPHER_CTX *keyed(const EVP_CIPHER *cipher, const unsigned char *key, int encrypt) {
    EVP_CIPHER_CTX *ctx = ssl.ctx_new();
    if (ctx == NULL)
        return NULL;
    if (ssl.init(ctx, cipher, NULL, key, NULL, encrypt) != 1 || ssl.set_padding(ctx, 0) != 1) {
        ssl.ctx_free(ctx);
        return NULL;
    }
    return ctx;
}

PyDoc_STRVAR(crypt_doc,
"crypt(mode, key, data, first_iv, iv_step, sector_size, encrypt, iv_mode, essiv_key)\n\n"
"Encrypt or decrypt `data` (a writable buffer of whole sectors) in place.  mode: 0 XTS, 1 CBC;\n"
"sector k's IV number is first_iv + k * iv_step (512-byte units); iv_mode: 0 plain (32 bits),\n"
"1 plain64, 2 ESSIV (the number encrypted with AES-ECB under essiv_key).");

static PyObject *crypt_sectors(PyObject *module, PyObject *args) {
    int mode, encrypt, iv_mode, sector_size;
    unsigned long long first_iv, iv_step;
    Py_buffer key, data, essiv_key;
    if (!PyArg_ParseTuple(args, "iy*w*KKipiy*", &mode, &key, &data, &first_iv, &iv_step, &sector_size, &encrypt,
                          &iv_mode, &essiv_key))
        return NULL;
    PyObject *result = NULL;
    EVP_CIPHER_CTX *ctx = NULL, *essiv = NULL;
    const EVP_CIPHER *cipher = (mode == XTS || mode == CBC) ? cipher_for(mode, key.len) : NULL;
    if (cipher == NULL) {
        PyErr_Format(PyExc_ValueError, "no AES cipher for mode %d with a %zd-byte key", mode, key.len);
        goto out;
    }
    if (sector_size <= 0 || sector_size % 16 || data.len % sector_size) {
        PyErr_Format(PyExc_ValueError, "%zd bytes is not a whole number of %d-byte sectors", data.len, sector_size);
        goto out;
    }
    if (iv_mode == IV_ESSIV) {
        const EVP_CIPHER *ecb = cipher_for(ECB, essiv_key.len);
        if (ecb == NULL) {
            PyErr_Format(PyExc_ValueError, "no AES key of %zd bytes for ESSIV", essiv_key.len);
            goto out;
        }
        essiv = keyed(ecb, essiv_key.buf, 1);
    }
    ctx = keyed(cipher, key.buf, encrypt);
    if (ctx == NULL || (iv_mode == IV_ESSIV && essiv == NULL)) {
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL could not set up the cipher");
        goto out;
    }
    int failed = 0;
    unsigned char *sector = data.buf;
    Py_ssize_t count = data.len / sector_size;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t k = 0; k < count && !failed; k++, sector += sector_size) {
        uint64_t number = first_iv + (uint64_t)k * iv_step;
        if (iv_mode == IV_PLAIN)
            number &= 0xFFFFFFFFu;
        unsigned char iv[16] = {0};
        for (int i = 0; i < 8; i++)
            iv[i] = (unsigned char)(number >> (8 * i));
        int length;
        if (iv_mode == IV_ESSIV)
            failed |= ssl.update(essiv, iv, &length, iv, 16) != 1;
        /* A new IV on the keyed context: the key schedule is kept. */
        failed |= ssl.init(ctx, NULL, NULL, NULL, iv, -1) != 1;
        failed |= ssl.update(ctx, sector, &length, sector, sector_size) != 1;
    }
    Py_END_ALLOW_THREADS
    if (failed)
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL failed to process a sector");
    else
        result = Py_NewRef(Py_None);
out:
    if (ctx != NULL)
        ssl.ctx_free(ctx);
    if (essiv != NULL)
        ssl.ctx_free(essiv);
    PyBuffer_Release(&key);
    PyBuffer_Release(&data);
    PyBuffer_Release(&essiv_key);
    return result;
}

static PyMethodDef methods[] = {
    {"crypt", crypt_sectors, METH_VARARGS, crypt_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_sectors", "LUKS sector encryption with OpenSSL's EVP XTS and CBC, GIL released.",
    -1, methods,
};

static int load_libcrypto(void) {
    void *library = dlopen("libcrypto.so.3", RTLD_NOW | RTLD_LOCAL);
    if (library == NULL) {
        PyErr_Format(PyExc_ImportError, "cannot load libcrypto.so.3: %s", dlerror());
        return -1;
    }
    struct { void **slot; const char *name; } symbols[] = {
        {(void **)&ssl.fetch, "EVP_CIPHER_fetch"},
        {(void **)&ssl.ctx_new, "EVP_CIPHER_CTX_new"},
        {(void **)&ssl.ctx_free, "EVP_CIPHER_CTX_free"},
        {(void **)&ssl.init, "EVP_CipherInit_ex"},
        {(void **)&ssl.update, "EVP_CipherUpdate"},
        {(void **)&ssl.set_padding, "EVP_CIPHER_CTX_set_padding"},
    };
    for (size_t i = 0; i < sizeof symbols / sizeof symbols[0]; i++) {
        *symbols[i].slot = dlsym(library, symbols[i].name);
        if (*symbols[i].slot == NULL) {
            PyErr_Format(PyExc_ImportError, "libcrypto.so.3 has no %s", symbols[i].name);
            return -1;
        }
    }
    static const int BITS[3] = {128, 192, 256};
    for (int mode = 0; mode < MODES; mode++) {
        for (int i = 0; i < 3; i++) {
            if (mode == XTS && BITS[i] == 192)
                continue;  /* XTS-AES exists with 128- and 256-bit keys only */
            char name[32];
            snprintf(name, sizeof name, "AES-%d-%s", BITS[i], MODE_NAMES[mode]);
            ciphers[mode][i] = ssl.fetch(NULL, name, NULL);
            if (ciphers[mode][i] == NULL) {
                PyErr_Format(PyExc_ImportError, "libcrypto.so.3 has no %s", name);
                return -1;
            }
        }
    }
    return 0;
}

PyMODINIT_FUNC PyInit__sectors(void) {
    static int loaded;
    if (!loaded && load_libcrypto() < 0)
        return NULL;
    loaded = 1;
    return PyModule_Create(&module_def);
}
