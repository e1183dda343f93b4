package process

import "sync"

// Ring keeps the last Size bytes written to it and lets readers follow new
// output by absolute offset.
type Ring struct {
	mu    sync.Mutex // protects buf, total and wake
	buf   []byte     // circular; byte at absolute offset n is buf[n%len(buf)]
	total int64      // bytes ever written
	wake  chan struct{}
}

func NewRing(size int) *Ring {
	return &Ring{buf: make([]byte, size), wake: make(chan struct{})}
}

func (r *Ring) Write(p []byte) (int, error) {
	n := len(p)
	if n == 0 {
		return 0, nil
	}
	r.mu.Lock()
	if len(p) > len(r.buf) {
		r.total += int64(len(p) - len(r.buf))
		p = p[len(p)-len(r.buf):]
	}
	for len(p) > 0 {
		at := int(r.total % int64(len(r.buf)))
		c := copy(r.buf[at:], p)
		p = p[c:]
		r.total += int64(c)
	}
	// Closing wakes every follower at once; the next write gets a fresh one.
	close(r.wake)
	r.wake = make(chan struct{})
	r.mu.Unlock()
	return n, nil
}

// ReadFrom returns the bytes from absolute offset off (or from the oldest
// byte still held, if off has been overwritten) up to now, the offset to
// continue from, and a channel closed at the next write.
func (r *Ring) ReadFrom(off int64) ([]byte, int64, <-chan struct{}) {
	r.mu.Lock()
	defer r.mu.Unlock()
	oldest := r.total - int64(len(r.buf))
	if oldest < 0 {
		oldest = 0
	}
	if off < oldest {
		off = oldest
	}
	if off > r.total {
		off = r.total
	}
	out := make([]byte, 0, r.total-off)
	for o := off; o < r.total; {
		at := int(o % int64(len(r.buf)))
		end := len(r.buf)
		if rem := r.total - o; int64(end-at) > rem {
			end = at + int(rem)
		}
		out = append(out, r.buf[at:end]...)
		o += int64(end - at)
	}
	return out, r.total, r.wake
}
