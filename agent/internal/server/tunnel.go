package server

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"cocoon/agent/internal/apierr"
)

// CodeUnreachable answers a tunnel to a port nothing listens on.
const CodeUnreachable = "Unreachable"

// tunnelDialTimeout bounds the dial to a guest port (loopback: it answers
// at once or not at all, unless the guest is overloaded).
const tunnelDialTimeout = 5 * time.Second

// tunnel relays raw TCP between the host and a port on the guest's loopback,
// so the host reaches any guest port through the agent's one forwarded port
// (the endpoint router's "{port}-{id}" hosts) instead of a forward per port.
func (s *Server) tunnel(w http.ResponseWriter, r *http.Request) {
	if !headerHasToken(r.Header, "Connection", "upgrade") || !headerHasToken(r.Header, "Upgrade", "cocoon-tunnel") {
		apierr.Write(w, apierr.BadRequest("expected Connection: Upgrade and Upgrade: cocoon-tunnel"))
		return
	}
	raw := r.URL.Query().Get("port")
	port, err := strconv.ParseUint(raw, 10, 16)
	if err != nil || port == 0 {
		apierr.Write(w, apierr.BadRequest(fmt.Sprintf("port must be an integer between 1 and 65535, got %q", raw)))
		return
	}
	// Dialled before the upgrade, so a closed port is still a JSON error.
	upstream, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", raw), tunnelDialTimeout)
	if err != nil {
		apierr.Write(w, apierr.New(http.StatusBadGateway, CodeUnreachable, fmt.Sprintf("nothing answers on port %d in the guest", port)))
		return
	}
	hj, ok := w.(http.Hijacker)
	if !ok {
		upstream.Close()
		apierr.Write(w, apierr.Internal("connection cannot be upgraded"))
		return
	}
	conn, brw, err := hj.Hijack()
	if err != nil {
		upstream.Close()
		return
	}
	_, err = brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: cocoon-tunnel\r\n\r\n")
	if err == nil {
		err = brw.Flush()
	}
	if err != nil {
		upstream.Close()
		conn.Close()
		return
	}
	relay(conn, brw.Reader, upstream)
}

// relay copies both ways until both directions have ended; the end of one
// direction is passed on as a half-close, as TCP would.
func relay(client net.Conn, clientIn *bufio.Reader, upstream net.Conn) {
	var wg sync.WaitGroup
	wg.Add(2)
	pipe := func(dst net.Conn, src io.Reader) {
		defer wg.Done()
		_, _ = io.Copy(dst, src)
		if tc, ok := dst.(interface{ CloseWrite() error }); ok {
			_ = tc.CloseWrite()
		} else {
			_ = dst.Close()
		}
	}
	go pipe(upstream, clientIn)
	go pipe(client, upstream)
	wg.Wait()
	client.Close()
	upstream.Close()
}
