import ArgumentParser
import BlockEngine
import ImageFormats
#if canImport(Glibc)
import Glibc
#endif

struct ConvertCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "convert",
        abstract: "Copy the guest disk of SOURCE (any format rawmount reads, with its backing chain) into a new DESTINATION image.",
        discussion: "Sparse: ranges that are unallocated or read as zeros (checked per 4 KiB, as qemu-img -S 4k) are not written. An existing DESTINATION file is replaced, as qemu-img replaces it; the source itself never is. Creation options (-o) are those of `rawmount create`.")

    @Option(name: [.customShort("O"), .customLong("output-format")], help: "Format of DESTINATION: raw (default), qcow2, qed, vdi or vmdk.",
            completion: .list(["raw", "qcow2", "qed", "vdi", "vmdk"]))
    var outputFormat: String = "raw"

    @Option(name: [.customShort("f"), .long], help: "Format of SOURCE; probed when omitted.", completion: .list(ImageFormat.allCases.map(\.rawValue)))
    var format: String?

    @Option(name: .customShort("o"), help: ArgumentHelp("Creation options for DESTINATION (qemu-img's names: cluster_size=, compat=, subformat=, static=on, ...).", valueName: "options"))
    var creationOptions: [String] = []

    @Option(name: [.customShort("l"), .customLong("snapshot")], help: "qcow2: copy this internal snapshot (ID or name) instead of the current disk.")
    var snapshot: String?

    @Flag(name: .customShort("p"), help: "Show progress (percent, bytes, rate) on stderr; shown anyway when both stdout and stderr are terminals.")
    var progress = false

    @Flag(name: [.customShort("U"), .customLong("force-share")], help: "Take no lock on SOURCE (it may be in use by a writer; the copy can then be inconsistent).")
    var forceShare = false

    @Option(name: .customShort("t"), help: ArgumentHelp("Cache mode of DESTINATION, as qemu-img convert's -t: unsafe (default: never fdatasynced; a crash leaves a partial copy to redo) or writeback (fdatasynced in the format's order and at the end).", valueName: "cache"))
    var cache: String = "unsafe"

    @Flag(help: "Print a JSON summary (bytes read and written, seconds) on stdout.")
    var json = false

    @Argument(help: "The image to copy.", completion: .file())
    var source: String

    @Argument(help: "The image to create.", completion: .file())
    var destination: String

    func run() throws {
        do {
            let fmt = try parseFormat(format)
            let out = outputFormat.lowercased()
            guard ["raw", "qcow2", "qed", "vdi", "vmdk"].contains(out) else {
                throw BlockError.usage("-O \(outputFormat): rawmount converts to raw, qcow2, qed, vdi or vmdk")
            }
            guard cache == "unsafe" || cache == "writeback" else { throw BlockError.usage("-t \(cache): unsafe or writeback") }
            let src = try ImageOpener.open(path: source, options: .init(writable: false, format: fmt, lock: !forceShare, snapshot: snapshot))
            defer { try? src.close() }
            var create = try CreateCommand.parse(["-f", out, "-q"] + creationOptions.flatMap { ["-o", $0] } + [destination, String(src.virtualSize)])
            try create.applyCreationOptions()
            // A streamOptimized VMDK is written once, in order, compressed: not through the
            // engine, which writes in place. Refused before anything is created.
            if out == "vmdk" && create.subformat == "streamOptimized" {
                throw BlockError.unsupported(file: destination, feature: "writing a streamOptimized VMDK (convert to monolithicSparse, or use qemu-img convert -o subformat=streamOptimized)")
            }
            try replaceDestination(sourceChain: src)
            try create.createImage()
            ImageFile.syncDisabled.store(cache == "unsafe", ordering: .relaxed)
            let dst = try ImageOpener.open(path: destination, options: .init(writable: true, format: ImageFormat(rawValue: out), lock: true))
            let began = monotonicSeconds()
            let bar = Progress(total: src.virtualSize,
                               enabled: isatty(STDERR_FILENO) == 1 && !json && (progress || isatty(STDOUT_FILENO) == 1))
            let copied: ImageCopy.Totals
            do {
                copied = try ImageCopy(source: src, destination: dst).run { bar.show($0) }
                try dst.flush()
                try dst.close()
            } catch {
                try? dst.close()
                throw error
            }
            bar.finish()
            let seconds = monotonicSeconds() - began
            if json {
                print(QemuImageInfo.json([
                    "source": source, "destination": destination, "format": out, "virtual-size": src.virtualSize,
                    "bytes-read": copied.read, "bytes-written": copied.written, "seconds": (seconds * 1000).rounded() / 1000,
                ] as [String: Any]))
            }
        } catch let e as ExitCode { throw e } catch {
            printError("rawmount: \(describe(error))")
            throw ExitCode.failure
        }
    }

    /// qemu-img replaces an existing destination; rawmount does too, except a file of the
    /// source's own chain or anything that is not a regular file.
    private func replaceDestination(sourceChain: BlockDevice) throws {
        var st = stat()
        guard lstat(destination, &st) == 0 else { return }
        guard st.st_mode & S_IFMT == S_IFREG else {
            throw BlockError.usage("\(destination): exists and is not a regular file; rawmount convert writes new image files only")
        }
        var layer: BlockDevice? = sourceChain
        while let l = layer {
            if let id = l.driver.file.identity, UInt64(st.st_dev) == id.device && UInt64(st.st_ino) == id.inode {
                throw BlockError.usage("\(destination): is \(l === sourceChain ? "the source image" : "a backing file of the source"); convert into a new file")
            }
            layer = l.backing
        }
        guard unlink(destination) == 0 else { throw BlockError.io(file: destination, operation: "replace", offset: nil, errno: errno) }
    }
}

/// The copy itself: the source's data runs are read in large pieces and written to the
/// destination through the engine, skipping every 4 KiB block that reads as zeros (the new
/// image already reads as zeros there). A reader thread keeps the next piece coming while
/// the current one is written.
struct ImageCopy {
    let source: BlockDevice
    let destination: BlockDevice
    static let piece = 4 << 20, block = 4096

    struct Totals { var read: UInt64 = 0, written: UInt64 = 0 }

    func run(progress: (UInt64) -> Void) throws -> Totals {
        var totals = Totals()
        let size = source.virtualSize
        // The pieces to copy: data runs only, each at most `piece` long.
        var runs: [(offset: UInt64, length: Int)] = []
        var pos: UInt64 = 0
        while pos < size {
            let s = try source.status(pos, maxLength: size - pos)
            if s.data {
                var o = pos
                while o < pos + s.length {
                    let n = Int(min(UInt64(Self.piece), pos + s.length - o))
                    runs.append((o, n)); o += UInt64(n)
                }
            }
            pos += s.length
        }
        let buffers = [UnsafeMutableRawBufferPointer.allocate(byteCount: Self.piece, alignment: 4096),
                       UnsafeMutableRawBufferPointer.allocate(byteCount: Self.piece, alignment: 4096)]
        defer { for b in buffers { b.deallocate() } }
        let reader = PieceReader(source: source, runs: runs, buffers: buffers)
        defer { reader.stop() }
        for (i, run) in runs.enumerated() {
            let buf = try reader.take(i)
            totals.read += UInt64(run.length)
            var b = 0
            while b < run.length {
                // The longest stretch of blocks that are not all zeros, written in one call.
                while b < run.length, Self.isZero(buf, b, min(Self.block, run.length - b)) { b += Self.block }
                let start = b
                while b < run.length, !Self.isZero(buf, b, min(Self.block, run.length - b)) { b += Self.block }
                let end = min(b, run.length)
                if end > start {
                    try destination.write(UnsafeRawBufferPointer(rebasing: buf[start..<end]), at: run.offset + UInt64(start))
                    totals.written += UInt64(end - start)
                }
            }
            reader.release(i)
            progress(run.offset + UInt64(run.length))
        }
        return totals
    }

    static func isZero(_ buf: UnsafeMutableRawBufferPointer, _ at: Int, _ count: Int) -> Bool {
        let base = buf.baseAddress! + at
        var i = 0
        while i + 8 <= count {
            if base.loadUnaligned(fromByteOffset: i, as: UInt64.self) != 0 { return false }
            i += 8
        }
        while i < count { if base.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }; i += 1 }
        return true
    }
}

/// Reads piece i+1 into the other buffer while piece i is written.
final class PieceReader: @unchecked Sendable {
    private let source: BlockDevice
    private let runs: [(offset: UInt64, length: Int)]
    private let buffers: [UnsafeMutableRawBufferPointer]
    private var cond = pthread_cond_t(), lock = pthread_mutex_t()
    private var ready = -1, freed = -1, failure: Error?, stopped = false
    private var thread: pthread_t?

    init(source: BlockDevice, runs: [(offset: UInt64, length: Int)], buffers: [UnsafeMutableRawBufferPointer]) {
        self.source = source; self.runs = runs; self.buffers = buffers
        pthread_mutex_init(&lock, nil); pthread_cond_init(&cond, nil)
        guard !runs.isEmpty else { return }
        let me = Unmanaged.passRetained(self).toOpaque()
        var t = pthread_t()
        pthread_create(&t, nil, { arg in
            let r = Unmanaged<PieceReader>.fromOpaque(arg!).takeRetainedValue()
            r.loop()
            return nil
        }, me)
        thread = t
    }

    private func loop() {
        for i in runs.indices {
            pthread_mutex_lock(&lock)
            // Buffer i % 2 is free once piece i - 2 has been written.
            while !stopped && freed < i - 2 { pthread_cond_wait(&cond, &lock) }
            let stop = stopped
            pthread_mutex_unlock(&lock)
            if stop { return }
            var err: Error?
            do {
                try source.read(into: UnsafeMutableRawBufferPointer(rebasing: buffers[i % 2][0..<runs[i].length]), at: runs[i].offset)
            } catch { err = error }
            pthread_mutex_lock(&lock)
            if let err { failure = err } else { ready = i }
            pthread_cond_broadcast(&cond)
            pthread_mutex_unlock(&lock)
            if err != nil { return }
        }
    }

    func take(_ i: Int) throws -> UnsafeMutableRawBufferPointer {
        pthread_mutex_lock(&lock)
        defer { pthread_mutex_unlock(&lock) }
        while ready < i && failure == nil { pthread_cond_wait(&cond, &lock) }
        if ready < i, let failure { throw failure }
        return buffers[i % 2]
    }

    func release(_ i: Int) {
        pthread_mutex_lock(&lock)
        freed = i
        pthread_cond_broadcast(&cond)
        pthread_mutex_unlock(&lock)
    }

    func stop() {
        pthread_mutex_lock(&lock)
        stopped = true
        pthread_cond_broadcast(&cond)
        pthread_mutex_unlock(&lock)
        if let thread { pthread_join(thread, nil) }
    }
}
