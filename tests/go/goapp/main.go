// tlshub-goapp: a test app written in Go, for the VM scenarios. Its
// sockets are the Go runtime's: non-blocking, waited on by the netpoller
// (edge-triggered epoll), and its bytes move the ways Go moves them:
// Read and Write; sendfile(2) when a TCP connection is copied from an
// *os.File; splice(2) when it is copied from another TCP connection.
//
// Its streams are those of the Rust test apps (tests/src/pattern.rs):
// pseudo-random bytes from a seed, with a plaintext marker every 4 KiB, so
// the wire checks can decrypt them and look for the marker.
//
//	tlshub-goapp server -listen ADDR -conns N -size S -send write|sendfile
//	tlshub-goapp client -connect ADDR -conns N -size S -send write|sendfile
//	tlshub-goapp proxy  -listen ADDR -connect ADDR -conns N
//
// The server and the client run the client-first exchange on N
// connections at once: the client sends S bytes, the server checks them
// and answers S bytes, half-closes and waits for the client's close, which
// comes once the client has checked the answer and read the server's end. The
// proxy forwards N connections both ways with io.Copy (splice) and
// half-closes each direction at its end. Each prints "listening" on
// stderr when it listens, and one JSON report on stdout at the end (the
// fields of tests/src/app_report.rs it fills).
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
)

const (
	clientSeed = 0xc11e
	serverSeed = 0x5e4e
	marker     = "TLSHUB-PLAINTEXT-MARKER"
)

// fill writes the stream of seed at offset into buf (pattern::fill).
func fill(seed, offset uint64, buf []byte) {
	for i := range buf {
		pos := offset + uint64(i)
		inBlock := pos % 4096
		if inBlock < uint64(len(marker)) {
			buf[i] = marker[inBlock]
			continue
		}
		z := pos + seed + 0x9e3779b97f4a7c15
		z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
		z = (z ^ (z >> 27)) * 0x94d049bb133111eb
		buf[i] = byte(z ^ (z >> 31))
	}
}

type report struct {
	Ok            bool   `json:"ok"`
	Role          string `json:"role"`
	Pid           int    `json:"pid"`
	Uid           int    `json:"uid"`
	Connections   uint32 `json:"connections"`
	BytesSent     uint64 `json:"bytes_sent"`
	BytesReceived uint64 `json:"bytes_received"`
	Error         string `json:"error,omitempty"`
	Errno         *int   `json:"errno,omitempty"`
}

type tally struct {
	connections, sent, received atomic.Uint64
	mu                          sync.Mutex
	first                       error
}

func (t *tally) fail(err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.first == nil {
		t.first = err
	}
}

// readStream reads exactly size bytes of seed's stream from c and checks them.
func readStream(c net.Conn, seed uint64, size int, t *tally) error {
	buf := make([]byte, size)
	if _, err := io.ReadFull(c, buf); err != nil {
		return fmt.Errorf("read: %w", err)
	}
	t.received.Add(uint64(size))
	want := make([]byte, size)
	fill(seed, 0, want)
	for i := range buf {
		if buf[i] != want[i] {
			return fmt.Errorf("byte %d of %d is not what the peer sent", i, size)
		}
	}
	return nil
}

// sendFile sends size bytes of seed's stream from a file, so that io.Copy
// to the connection is a sendfile(2).
func sendFile(c *net.TCPConn, seed uint64, size int) error {
	f, err := os.CreateTemp("", "goapp-send-")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	buf := make([]byte, size)
	fill(seed, 0, buf)
	if _, err := f.Write(buf); err != nil {
		return err
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return err
	}
	n, err := io.Copy(c, f)
	if err == nil && n != int64(size) {
		err = fmt.Errorf("sendfile sent %d of %d bytes", n, size)
	}
	return err
}

// sendPattern sends size bytes of seed's pattern the way send names
// ("sendfile", or one Write) and counts them.
func sendPattern(c *net.TCPConn, seed uint64, size int, send string, t *tally) error {
	var err error
	if send == "sendfile" {
		err = sendFile(c, seed, size)
	} else {
		buf := make([]byte, size)
		fill(seed, 0, buf)
		_, err = c.Write(buf)
	}
	if err != nil {
		return fmt.Errorf("send: %w", err)
	}
	t.sent.Add(uint64(size))
	return nil
}

func serve(c *net.TCPConn, size int, send string, t *tally) error {
	defer c.Close()
	if err := readStream(c, clientSeed, size, t); err != nil {
		return err
	}
	if err := sendPattern(c, serverSeed, size, send, t); err != nil {
		return err
	}
	// Half-close, then wait for the client's close: a close() right after
	// the last write could drop what kTLS has not handed to TCP yet.
	if err := c.CloseWrite(); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	if n, err := io.Copy(io.Discard, c); err != nil || n != 0 {
		return fmt.Errorf("after the answer: %d bytes more, %v", n, err)
	}
	t.connections.Add(1)
	return nil
}

func exchange(addr string, size int, send string, t *tally) error {
	dialed, err := net.Dial("tcp", addr)
	if err != nil {
		return err
	}
	conn := dialed.(*net.TCPConn)
	defer conn.Close()
	if err := sendPattern(conn, clientSeed, size, send, t); err != nil {
		return err
	}
	if err := readStream(conn, serverSeed, size, t); err != nil {
		return err
	}
	if n, err := io.Copy(io.Discard, conn); err != nil || n != 0 {
		return fmt.Errorf("after the answer: %d bytes more, %v", n, err)
	}
	t.connections.Add(1)
	return nil
}

// forward copies both ways between down and up (splice: both are TCP
// connections), half-closing each direction when its source ends.
func forward(down, up *net.TCPConn, t *tally) error {
	defer down.Close()
	defer up.Close()
	errs := make(chan error, 2)
	pipe := func(dst, src *net.TCPConn, n *atomic.Uint64) {
		copied, err := io.Copy(dst, src)
		n.Add(uint64(copied))
		if err == nil {
			err = dst.CloseWrite()
		}
		errs <- err
	}
	go pipe(up, down, &t.sent)
	go pipe(down, up, &t.received)
	for i := 0; i < 2; i++ {
		if err := <-errs; err != nil {
			return err
		}
	}
	t.connections.Add(1)
	return nil
}

func accept(l *net.TCPListener, conns int, t *tally, handle func(*net.TCPConn) error) {
	var wg sync.WaitGroup
	for i := 0; i < conns; i++ {
		c, err := l.AcceptTCP()
		if err != nil {
			t.fail(fmt.Errorf("accept: %w", err))
			break
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := handle(c); err != nil {
				t.fail(err)
			}
		}()
	}
	wg.Wait()
}

func listen(addr string) (*net.TCPListener, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	fmt.Fprintln(os.Stderr, "listening", addr)
	return l.(*net.TCPListener), nil
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: tlshub-goapp server|client|proxy [flags]")
		os.Exit(2)
	}
	role := os.Args[1]
	fs := flag.NewFlagSet(role, flag.ExitOnError)
	listenAddr := fs.String("listen", "", "address to listen on (server, proxy)")
	connectAddr := fs.String("connect", "", "address to connect to (client, proxy)")
	conns := fs.Int("conns", 1, "connections, all at once")
	size := fs.Int("size", 1, "bytes each way per connection")
	send := fs.String("send", "write", "how the client and the server send: write or sendfile")
	_ = fs.Parse(os.Args[2:])

	t := &tally{}
	r := report{Role: role, Pid: os.Getpid(), Uid: os.Getuid()}
	switch role {
	case "server", "proxy":
		r.Role = "server"
		l, err := listen(*listenAddr)
		if err != nil {
			t.fail(err)
			break
		}
		accept(l, *conns, t, func(c *net.TCPConn) error {
			if role == "server" {
				return serve(c, *size, *send, t)
			}
			up, err := net.Dial("tcp", *connectAddr)
			if err != nil {
				c.Close()
				return err
			}
			return forward(c, up.(*net.TCPConn), t)
		})
		l.Close()
	case "client":
		var wg sync.WaitGroup
		for i := 0; i < *conns; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := exchange(*connectAddr, *size, *send, t); err != nil {
					t.fail(err)
				}
			}()
		}
		wg.Wait()
	default:
		t.fail(fmt.Errorf("unknown role %q", role))
	}
	r.Connections = uint32(t.connections.Load())
	r.BytesSent = t.sent.Load()
	r.BytesReceived = t.received.Load()
	r.Ok = t.first == nil
	if t.first != nil {
		r.Error = t.first.Error()
		var errno syscall.Errno
		if errors.As(t.first, &errno) {
			n := int(errno)
			r.Errno = &n
		}
	}
	out, _ := json.Marshal(r)
	fmt.Println(string(out))
	if !r.Ok {
		os.Exit(1)
	}
}
