import ArgumentParser
import BlockEngine
import ImageFormats
import FuseAdapter
#if canImport(Glibc)
import Glibc
#endif

struct ServeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Serve IMAGE's guest disk over NBD: nbdkit with rawmount's plugin, until interrupted.",
        discussion: "Prints the NBD URI once nbdkit listens (nbd+unix:///?socket=... or nbd://host:port), so qemu-img, nbdcopy, nbdinfo, nbd-client and QEMU can use it. Ctrl-C or SIGTERM stops nbdkit cleanly: the image is flushed and closed as `unmount` closes it. Image locks are taken as for a mount. The plugin (librawmount-nbdkit.so) is found next to this binary or in ../lib/rawmount/ (make install puts it there); nbdkit can also load it directly: nbdkit librawmount-nbdkit.so image=FILE [format=] [readonly=true] [snapshot=]." + Examples.section("serve"))

    @Flag(name: [.customShort("r"), .long], help: "Serve read-only: the image is opened O_RDONLY and never changes.")
    var readOnly = false

    @Flag(name: [.customShort("U"), .customLong("force-share")], help: "With --read-only: take no image locks.")
    var forceShare = false

    @Option(name: [.customShort("f"), .long], help: "Image format; probed when omitted.", completion: .list(ImageFormat.allCases.map(\.rawValue)))
    var format: String?

    @Option(name: [.customShort("l"), .customLong("snapshot")], help: "qcow2: serve this internal snapshot (read-only).")
    var snapshot: String?

    @Option(help: ArgumentHelp("Listen on this Unix socket (the usual choice on one machine).", valueName: "socket"))
    var unix: String?

    @Option(name: [.customShort("p"), .long], help: "Listen on this TCP port (default 10809, NBD's port, when --unix is not given).")
    var port: Int?

    @Option(help: ArgumentHelp("TCP: listen on this address (default localhost: loopback only; 0.0.0.0 or :: for every address).", valueName: "address"))
    var bind: String?

    @Option(help: ArgumentHelp("off (default), on (offered) or require, as nbdkit's --tls.", valueName: "mode"))
    var tls: String = "off"

    @Option(help: ArgumentHelp("Directory with ca-cert.pem, server-cert.pem and server-key.pem for TLS (nbdkit --tls-certificates).", valueName: "dir"))
    var tlsCertificates: String?

    @Option(help: ArgumentHelp("Pre-shared keys file for TLS (nbdkit --tls-psk).", valueName: "file"))
    var tlsPsk: String?

    @Option(name: [.customShort("t"), .long], help: "nbdkit worker threads per connection (default: twice the cores, 4 to 16; nbdkit's own default is 16, and on few cores the extra hand-offs between its threads cost more than they overlap).")
    var threads: Int?

    @Flag(name: [.customShort("v"), .long], help: "nbdkit's verbose log (every request) on stderr.")
    var verbose = false

    @Argument(help: "The disk image.", completion: .file())
    var image: String

    func validate() throws {
        if unix != nil && port != nil { throw ValidationError("--unix and --port do not go together") }
        if forceShare && !readOnly { throw ValidationError("--force-share needs --read-only: a writer must hold the image's locks") }
        guard ["off", "on", "require"].contains(tls) else { throw ValidationError("--tls \(tls): off, on or require") }
        if tls != "off" && tlsCertificates == nil && tlsPsk == nil {
            throw ValidationError("--tls \(tls) needs --tls-certificates DIR or --tls-psk FILE")
        }
        if let port, !(1...65535).contains(port) { throw ValidationError("--port \(port): 1 to 65535") }
        if let threads, !(1...256).contains(threads) { throw ValidationError("--threads \(threads): 1 to 256") }
    }

    func run() throws {
        do {
            let imagePath = try Paths.asNamed(image)
            guard access(imagePath, R_OK) == 0 else {
                throw BlockError.usage("\(image): cannot open the image: \(String(cString: strerror(errno)))")
            }
            let plugin = try Self.pluginPath()
            guard let nbdkit = Self.findInPath("nbdkit") else {
                throw BlockError.usage("nbdkit is not installed (apt-get install nbdkit; `make deps` does)")
            }
            let state = try Paths.stateDirectory() + "/serve-\(getpid())"
            mkdir(state, 0o700)
            defer { unlink(state + "/nbdkit.pid"); unlink(state + "/ready"); rmdir(state) }
            var args = [nbdkit, "-f", "--exit-with-parent", "-P", state + "/nbdkit.pid"]
            if readOnly || snapshot != nil { args.append("-r") }
            let cores = Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))
            args += ["-t", String(threads ?? min(16, max(4, 2 * cores)))]
            let socket = try unix.map { try Paths.asNamed($0) }
            if let socket { try Self.clearStaleSocket(socket) }
            var listening: Int32? = nil
            if let socket {
                let mode = try Self.socketMode(image: imagePath, format: format.flatMap(ImageFormat.init(rawValue:)),
                                               writable: !readOnly && snapshot == nil)
                listening = try Self.listenOnUnix(socket, mode: mode)
            }
            defer { if let socket, let listening { close(listening); unlink(socket) } }
            if socket == nil {
                args += ["-p", String(port ?? 10809)]
                // Loopback unless asked: an export without TLS is open to whoever reaches it.
                args += ["-i", bind ?? "localhost"]
            }
            if tls != "off" { args.append("--tls=\(tls)") }
            if let tlsCertificates { args.append("--tls-certificates=\(try Paths.asNamed(tlsCertificates))") }
            if let tlsPsk { args.append("--tls-psk=\(try Paths.asNamed(tlsPsk))") }
            if verbose { args.append("-v") }
            args += [plugin, "image=\(imagePath)", "ready-file=\(state)/ready"]
            if let format { args.append("format=\(format)") }
            if readOnly || snapshot != nil { args.append("readonly=true") }
            if let snapshot { args.append("snapshot=\(snapshot)") }
            if forceShare { args.append("force-share=true") }
            let scheme = tls == "off" ? "nbd" : "nbds"
            let uri = socket.map { "\(scheme)+unix:///?socket=\($0)" } ?? "\(scheme)://\(bind ?? "localhost"):\(port ?? 10809)"
            throw ExitCode(try Self.runServer(args, readyFile: state + "/ready", uri: uri, image: imagePath, listening: listening))
        } catch let e as ExitCode { throw e } catch {
            printError("rawmount: \(describe(error))")
            throw ExitCode.failure
        }
    }

    /// librawmount-nbdkit.so next to this binary (a build tree) or in ../lib/rawmount (make install).
    static func pluginPath() throws -> String {
        var buf = [CChar](repeating: 0, count: 4097)
        let n = readlink("/proc/self/exe", &buf, 4096)
        let exe = n > 0 ? String(decoding: buf[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : ""
        let dir = PathName.directory(of: exe)
        let candidates = [dir + "/librawmount-nbdkit.so", PathName.directory(of: dir) + "/lib/rawmount/librawmount-nbdkit.so"]
        guard let found = candidates.first(where: { access($0, R_OK) == 0 }) else {
            throw BlockError.usage("the nbdkit plugin is missing (looked at \(candidates.joined(separator: " and "))); build it with `swift build` or install with `make install`")
        }
        return found
    }

    /// A socket left by a server that is gone (nbdkit killed, a crash) would make nbdkit fail
    /// with "Address already in use": remove it when nothing answers there. A live one, or a
    /// file that is not a socket, is refused.
    static func clearStaleSocket(_ path: String) throws {
        var st = stat()
        guard lstat(path, &st) == 0 else { return }
        guard st.st_mode & S_IFMT == S_IFSOCK else { throw BlockError.usage("\(path): exists and is not a socket") }
        var addr = try unixAddress(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        let connected = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if connected == 0 { throw BlockError.usage("\(path): another server is listening there") }
        unlink(path)
    }

    static func unixAddress(_ path: String) throws -> sockaddr_un {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: addr.sun_path) else { throw BlockError.usage("\(path): socket path too long") }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
            raw[bytes.count] = 0
        }
        return addr
    }

    /// The listening socket, made here rather than by nbdkit (which sets its own umask of
    /// 022), so it is created with `mode` and never exists with a wider one; nbdkit takes it
    /// by socket activation.
    static func listenOnUnix(_ path: String, mode: mode_t) throws -> Int32 {
        var addr = try unixAddress(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw BlockError.io(file: path, operation: "socket", offset: nil, errno: errno) }
        let oldMask = umask(0o777 & ~mode)
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        let err = errno
        umask(oldMask)
        guard bound == 0 else {
            close(fd)
            throw BlockError.usage("\(path): cannot listen there: \(String(cString: strerror(err)))")
        }
        guard listen(fd, 128) == 0 else {
            let e = errno
            close(fd); unlink(path)
            throw BlockError.usage("\(path): cannot listen there: \(String(cString: strerror(e)))")
        }
        return fd
    }

    /// The Unix socket's mode. Connecting needs write permission on it, given to a class
    /// (group, others) only if that class may read every file the disk's bytes come from,
    /// as a mount's raw file with allow_other: the socket is never a way around a private
    /// backing file, extent or base. (A TCP port is open to whoever reaches it: use
    /// --unix, or TLS with a pre-shared key, to choose who reads.) A writable export also
    /// needs the class to have write permission on the image itself.
    static func socketMode(image: String, format: ImageFormat?, writable: Bool) throws -> mode_t {
        let device = try ImageOpener.open(path: image, options: .init(writable: false, format: format, lock: false))
        defer { try? device.close() }
        let contributors = device.contributingFiles.compactMap { $0.fileStatus() }
        let top = contributors.first.map { $0.st_mode & 0o444 } ?? 0o400
        var readable = FuseFilesystem.readableMode(top | 0o400, uid: getuid(), gid: getgid(), contributors: contributors)
        if writable, let st = contributors.first { readable &= 0o400 | (st.st_mode & 0o222) << 1 }
        return readable | (readable & 0o444) >> 1  // read -> read and write
    }

    static func findInPath(_ name: String) -> String? {
        let path = getenv("PATH").map { String(cString: $0) } ?? "/usr/local/bin:/usr/bin:/bin"
        for dir in path.split(separator: ":") where access("\(dir)/\(name)", X_OK) == 0 { return "\(dir)/\(name)" }
        return nil
    }

    /// Runs nbdkit in the foreground, prints the URI once the plugin has opened the image
    /// (nbdkit listens by then; its pid file comes earlier, before the image is open), and
    /// passes SIGINT/SIGTERM/SIGHUP on to it, so its shutdown (which flushes and closes the
    /// image) always runs; returns its exit status.
    /// `listening`: a socket nbdkit takes by socket activation (as fd 3, with LISTEN_PID set
    /// to its own pid by the shell that execs it).
    static func runServer(_ args: [String], readyFile: String, uri: String, image: String, listening: Int32?) throws -> Int32 {
        var signals = sigset_t()
        sigemptyset(&signals)
        for s in [SIGINT, SIGTERM, SIGHUP] { sigaddset(&signals, s) }
        var old = sigset_t()
        pthread_sigmask(SIG_BLOCK, &signals, &old)
        defer { pthread_sigmask(SIG_SETMASK, &old, nil) }

        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var none = sigset_t()
        sigemptyset(&none)
        posix_spawnattr_setsigmask(&attr, &none)
        posix_spawnattr_setsigdefault(&attr, &signals)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        var argv = args
        var moved: Int32 = -1
        defer { if moved >= 0 { close(moved) } }
        if let listening {
            // (dup2 onto itself would keep close-on-exec: move a socket that is fd 3 first.)
            if listening == 3 { moved = fcntl(listening, F_DUPFD_CLOEXEC, 4) }
            posix_spawn_file_actions_adddup2(&actions, moved >= 0 ? moved : listening, 3)
            argv = ["/bin/sh", "-c", "export LISTEN_PID=$$ LISTEN_FDS=1; exec \"$@\"", "rawmount-serve"] + args
        }
        var cargs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
        defer { for p in cargs { free(p) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, argv[0], &actions, &attr, &cargs, environ)
        guard rc == 0 else { throw BlockError.usage("cannot start nbdkit: \(String(cString: strerror(rc)))") }

        var announced = false
        var timeout = timespec(tv_sec: 0, tv_nsec: 20_000_000)
        while true {
            var status: Int32 = 0
            let done = waitpid(pid, &status, WNOHANG)
            if done == pid {
                let code = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
                if !announced {
                    printError("rawmount: nbdkit exited before serving \(image) (status \(code)); its reason is above")
                    return code == 0 ? 1 : code
                }
                if code != 0 { printError("rawmount: nbdkit exited with status \(code)\((status & 0x7f) == 9 ? " (killed: the image was not closed cleanly)" : "")") }
                return code
            }
            if !announced, access(readyFile, F_OK) == 0 {
                announced = true
                print(uri)
                fflush(nil)
            }
            let s = sigtimedwait(&signals, nil, &timeout)
            if s > 0 { kill(pid, SIGTERM) }
        }
    }
}
