package process

import (
	"bytes"
	"os"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"cocoon/agent/internal/apierr"
)

func TestRing(t *testing.T) {
	r := NewRing(8)
	data, off, wake := r.ReadFrom(0)
	if len(data) != 0 || off != 0 {
		t.Fatalf("empty ring: %q %d", data, off)
	}
	r.Write([]byte("abcde"))
	select {
	case <-wake:
	default:
		t.Fatal("write did not wake followers")
	}
	if data, off, _ = r.ReadFrom(0); string(data) != "abcde" || off != 5 {
		t.Fatalf("%q %d", data, off)
	}
	r.Write([]byte("fghij")) // wraps; "ab" is gone
	if data, off, _ = r.ReadFrom(0); string(data) != "cdefghij" || off != 10 {
		t.Fatalf("wrapped: %q %d", data, off)
	}
	if data, _, _ = r.ReadFrom(7); string(data) != "hij" {
		t.Fatalf("from 7: %q", data)
	}
	r.Write([]byte("0123456789XY")) // larger than the ring
	if data, off, _ = r.ReadFrom(0); string(data) != "456789XY" || off != 22 {
		t.Fatalf("oversized write: %q %d", data, off)
	}
}

func TestSignals(t *testing.T) {
	for in, want := range map[string]syscall.Signal{"": syscall.SIGTERM, "SIGKILL": syscall.SIGKILL, "int": syscall.SIGINT, "9": syscall.SIGKILL, "HUP": syscall.SIGHUP} {
		if got, err := ParseSignal(in); err != nil || got != want {
			t.Errorf("ParseSignal(%q) = %v, %v", in, got, err)
		}
	}
	for _, bad := range []string{"SIGNOPE", "0", "99"} {
		if _, err := ParseSignal(bad); err == nil {
			t.Errorf("ParseSignal(%q) accepted", bad)
		}
	}
	if SignalName(syscall.SIGTERM) != "SIGTERM" {
		t.Fatal(SignalName(syscall.SIGTERM))
	}
}

// Many children exiting at once, some before their waiter could possibly
// be registered, each get exactly their own status.
func TestReaperDeliversEachStatus(t *testing.T) {
	r := DefaultReaper()
	var wg sync.WaitGroup
	for i := 0; i < 40; i++ {
		wg.Add(1)
		go func(code int) {
			defer wg.Done()
			p, err := Prepare(Spec{Argv: []string{"sh", "-c", "exit " + itoa(code)}}, nil)
			if err != nil {
				t.Error(err)
				return
			}
			null, _ := os.Open(os.DevNull)
			defer null.Close()
			_, ch, err := r.Start(func() (int, error) {
				return syscall.ForkExec(p.Path, p.Argv, &syscall.ProcAttr{Env: p.Env, Files: []uintptr{null.Fd(), null.Fd(), null.Fd()}})
			})
			if err != nil {
				t.Error(err)
				return
			}
			select {
			case ws := <-ch:
				if got := Exit(ws).Code; got != code {
					t.Errorf("exit %d, want %d", got, code)
				}
			case <-time.After(5 * time.Second):
				t.Errorf("no status for exit %d", code)
			}
		}(i % 7)
	}
	wg.Wait()
}

func itoa(n int) string { return strconv.Itoa(n) }

func TestPrepare(t *testing.T) {
	p, err := Prepare(Spec{Argv: []string{"sh", "-c", "true"}, Env: map[string]string{"A": "1"}}, map[string]string{"A": "0", "B": "2"})
	if err != nil {
		t.Fatal(err)
	}
	env := "\n" + string(bytes.Join(toBytes(p.Env), []byte("\n"))) + "\n"
	for _, want := range []string{"\nA=1\n", "\nB=2\n", "\nTERM=xterm\n", "\nPATH=" + DefaultPath + "\n", "\nHOME=", "\nUSER="} {
		if !bytes.Contains([]byte(env), []byte(want)) {
			t.Errorf("env lacks %q: %v", want, p.Env)
		}
	}
	if _, err := Prepare(Spec{Argv: []string{"nosuchcmd"}}, nil); apierr.From(err).Code != apierr.CodeCommandNotFound {
		t.Errorf("missing command: %v", err)
	}
	if _, err := Prepare(Spec{Argv: []string{"true"}, Env: map[string]string{"A=B": "x"}}, nil); apierr.From(err).Code != apierr.CodeBadRequest {
		t.Errorf("bad env key: %v", err)
	}
}

func toBytes(ss []string) [][]byte {
	out := make([][]byte, len(ss))
	for i, s := range ss {
		out[i] = []byte(s)
	}
	return out
}
