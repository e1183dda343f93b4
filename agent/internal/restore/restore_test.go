package restore

import (
	"os"
	"path/filepath"
	"testing"
)

func TestValidate(t *testing.T) {
	ok := Request{Token: "t", Entropy: make([]byte, 32)}
	if err := ok.Validate(); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []Request{
		{Entropy: make([]byte, 32)},
		{Token: "t", Entropy: make([]byte, 31)},
		{Token: "t", Entropy: make([]byte, 32), UnixTimeNs: -1},
	} {
		if bad.Validate() == nil {
			t.Errorf("accepted %+v", bad)
		}
	}
}

func TestRewriteMachineID(t *testing.T) {
	dir := t.TempDir()
	if err := RewriteMachineID(filepath.Join(dir, "absent")); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "absent")); !os.IsNotExist(err) {
		t.Fatal("created a machine-id that did not exist")
	}
	p := filepath.Join(dir, "machine-id")
	os.WriteFile(p, []byte("x\n"), 0o444)
	if err := RewriteMachineID(p); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(p)
	fi, _ := os.Stat(p)
	if len(b) != 33 || b[32] != '\n' || fi.Mode().Perm() != 0o444 {
		t.Fatalf("%q %v", b, fi.Mode())
	}
}
