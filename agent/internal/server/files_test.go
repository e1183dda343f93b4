package server

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

func fpath(route, p string, extra ...string) string {
	q := url.Values{"path": {p}}
	for i := 0; i+1 < len(extra); i += 2 {
		q.Set(extra[i], extra[i+1])
	}
	return route + "?" + q.Encode()
}

func TestFilesRoundTrip(t *testing.T) {
	h := newHarness(t)
	dir := t.TempDir()
	target := filepath.Join(dir, "a", "b", "blob.bin") // parents do not exist

	data := make([]byte, 3<<20+12345)
	_, _ = rand.Read(data)
	var put struct {
		Path string `json:"path"`
		Size int64  `json:"size"`
	}
	if st := h.do("PUT", fpath("/files", target, "mode", "0600"), data, &put); st != 200 {
		t.Fatalf("put: %d", st)
	}
	if put.Path != target || put.Size != int64(len(data)) {
		t.Fatalf("put answer: %+v", put)
	}
	// No temp file is left beside the target.
	if ents, _ := os.ReadDir(filepath.Dir(target)); len(ents) != 1 {
		t.Fatalf("dir has %d entries", len(ents))
	}

	resp := h.req("GET", fpath("/files", target), nil, testToken)
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/octet-stream" ||
		resp.Header.Get("Content-Length") != strconv.Itoa(len(data)) {
		t.Fatalf("get: %d %v", resp.StatusCode, resp.Header)
	}
	hs := sha256.New()
	n, _ := io.Copy(hs, resp.Body)
	resp.Body.Close()
	if want := sha256.Sum256(data); n != int64(len(data)) || !bytes.Equal(hs.Sum(nil), want[:]) {
		t.Fatalf("sha256 mismatch after %d bytes", n)
	}

	var st struct {
		Path, Name, Type, Mode, Mtime string
		Size                          int64
		UID, GID                      *int
	}
	if code := h.do("GET", fpath("/files/stat", target), nil, &st); code != 200 {
		t.Fatalf("stat: %d", code)
	}
	if st.Path != target || st.Name != "blob.bin" || st.Type != "file" || st.Mode != "0600" ||
		st.Size != int64(len(data)) || st.UID == nil || st.GID == nil || st.Mtime == "" {
		t.Fatalf("stat: %+v", st)
	}

	// Overwrite keeps the mode when none is given.
	if code := h.do("PUT", fpath("/files", target), "small", nil); code != 200 {
		t.Fatalf("overwrite: %d", code)
	}
	if fi, _ := os.Stat(target); fi.Mode().Perm() != 0o600 || fi.Size() != 5 {
		t.Fatalf("after overwrite: %v %d", fi.Mode(), fi.Size())
	}

	// Symlink stat and listing.
	if err := os.Symlink("blob.bin", filepath.Join(dir, "a", "b", "link")); err != nil {
		t.Fatal(err)
	}
	var lst struct {
		Type, LinkTarget string
	}
	h.do("GET", fpath("/files/stat", filepath.Join(dir, "a", "b", "link")), nil, &lst)
	if lst.Type != "symlink" || lst.LinkTarget != "blob.bin" {
		t.Fatalf("symlink stat: %+v", lst)
	}
	if code := h.do("POST", fpath("/files/mkdir", filepath.Join(dir, "a", "b", "sub", "deeper")), nil, nil); code != 200 {
		t.Fatalf("mkdir: %d", code)
	}
	if code := h.do("POST", fpath("/files/mkdir", filepath.Join(dir, "a", "b", "sub")), nil, nil); code != 200 {
		t.Fatalf("mkdir existing: %d", code)
	}
	var list struct {
		Path    string
		Entries []struct {
			Name, Type, Mode, Mtime string
			Size                    int64
		}
	}
	if code := h.do("GET", fpath("/files", filepath.Join(dir, "a", "b")), nil, &list); code != 200 {
		t.Fatalf("list: %d", code)
	}
	got := ""
	for _, e := range list.Entries {
		got += e.Name + ":" + e.Type + " "
	}
	if got != "blob.bin:file link:symlink sub:dir " || list.Path != filepath.Join(dir, "a", "b") {
		t.Fatalf("listing: %q %+v", got, list)
	}

	// Errors.
	var e apiError
	for _, tc := range []struct {
		method, path string
		status       int
		code         string
	}{
		{"GET", fpath("/files", filepath.Join(dir, "missing")), 404, "NotFound"},
		{"GET", fpath("/files/stat", filepath.Join(dir, "missing")), 404, "NotFound"},
		{"DELETE", fpath("/files", filepath.Join(dir, "missing")), 404, "NotFound"},
		{"GET", fpath("/files", "relative/path"), 400, "BadRequest"},
		{"GET", "/files", 400, "BadRequest"},
		{"PUT", fpath("/files", filepath.Join(dir, "a")), 409, "Conflict"},                       // a directory
		{"PUT", fpath("/files", filepath.Join(dir, "a", "b", "blob.bin", "x")), 409, "Conflict"}, // parent is a file
		{"POST", fpath("/files/mkdir", filepath.Join(dir, "a", "b", "blob.bin")), 409, "Conflict"},
		{"DELETE", fpath("/files", filepath.Join(dir, "a")), 409, "Conflict"}, // not empty
		{"PUT", fpath("/files", filepath.Join(dir, "x"), "mode", "99"), 400, "BadRequest"},
		{"PUT", fpath("/files", filepath.Join(dir, "x"), "user", "no-such-user-xyz"), 400, "BadRequest"},
	} {
		e = apiError{}
		if st := h.do(tc.method, tc.path, "body", &e); st != tc.status || e.Error.Code != tc.code {
			t.Errorf("%s %s: %d %+v", tc.method, tc.path, st, e)
		}
	}

	// Removal.
	if code := h.do("DELETE", fpath("/files", target), nil, nil); code != 200 {
		t.Fatalf("delete file: %d", code)
	}
	if code := h.do("DELETE", fpath("/files", filepath.Join(dir, "a"), "recursive", "true"), nil, nil); code != 200 {
		t.Fatalf("delete tree: %d", code)
	}
	if _, err := os.Stat(filepath.Join(dir, "a")); !os.IsNotExist(err) {
		t.Fatalf("tree still there: %v", err)
	}
}

// /proc files report size 0 but have content: GET must return it.
func TestFilesPseudoFile(t *testing.T) {
	h := newHarness(t)
	resp := h.req("GET", fpath("/files", "/proc/self/status"), nil, testToken)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !bytes.Contains(body, []byte("Pid:")) {
		t.Fatalf("get /proc/self/status: %d, %d bytes", resp.StatusCode, len(body))
	}
}
