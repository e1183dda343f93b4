package server

import (
	"net/http/httptest"
	"testing"
	"time"

	"cocoon/agent/internal/disk"
)

func TestDiskGrow(t *testing.T) {
	blocks := uint64(1 << 20) // 4 GiB of 4 KiB blocks
	fake := &disk.System{
		DeviceBytes: func(dev string) (uint64, error) { return 6 << 30, nil },
		Filesystem:  func(string) (uint64, uint64, error) { return 4096, blocks, nil },
		Resize: func(_ string, b uint64) error {
			blocks = b
			return nil
		},
		Poll: time.Millisecond,
	}
	srv := New(Options{Token: testToken, Restore: (&fakeSystem{}).system(""), RootDevice: "/dev/vda", Disk: fake})
	ts := httptest.NewServer(srv)
	t.Cleanup(func() { srv.Close(); ts.Close() })
	h := &harness{t: t, srv: srv, http: ts}

	var res disk.Result
	if code := h.do("POST", "/disk/grow", map[string]interface{}{"sizeBytes": 6 << 30}, &res); code != 200 || !res.Grown || res.FilesystemBytes != 6<<30 {
		t.Fatalf("grow: %d %+v", code, res)
	}
	// Again: nothing to do.
	if code := h.do("POST", "/disk/grow", map[string]interface{}{"sizeBytes": 6 << 30}, &res); code != 200 || res.Grown {
		t.Fatalf("grow again: %d %+v", code, res)
	}
	var e apiError
	if code := h.do("POST", "/disk/grow", map[string]interface{}{}, &e); code != 400 || e.Error.Code != "BadRequest" {
		t.Fatalf("no size: %d %+v", code, e)
	}
	if code := h.do("GET", "/disk/grow", nil, nil); code != 405 {
		t.Fatalf("GET: %d", code)
	}
}
