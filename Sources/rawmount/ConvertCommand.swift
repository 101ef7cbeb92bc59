import ArgumentParser
import BlockEngine
import ImageFormats
import Dispatch
#if canImport(Glibc)
import Glibc
#endif

struct ConvertCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "convert",
        abstract: "Copy the guest disk of SOURCE (any format rawmount reads, with its backing chain) into a new DESTINATION image.",
        discussion: "Sparse: ranges that are unallocated or read as zeros (checked per 4 KiB, as qemu-img -S 4k) are not written. An existing DESTINATION file is replaced, as qemu-img replaces it; the source itself never is. Creation options (-o) are those of `rawmount create`." + Examples.section("convert"))

    @Option(name: [.customShort("O"), .customLong("output-format")], help: "Format of DESTINATION: raw (default), qcow2, qed, vdi, vmdk or vpc (VHD).",
            completion: .list(CreateCommand.creatable))
    var outputFormat: String = "raw"

    @Option(name: [.customShort("f"), .long], help: "Format of SOURCE; probed when omitted.", completion: .list(ImageFormat.allCases.map(\.rawValue)))
    var format: String?

    @Option(name: .customShort("o"), help: ArgumentHelp("Creation options for DESTINATION (qemu-img's names: cluster_size=, compat=, subformat=, static=on, ...).", valueName: "options"))
    var creationOptions: [String] = []

    @Option(name: [.customShort("l"), .customLong("snapshot")], help: "qcow2: copy this internal snapshot (ID or name) instead of the current disk.")
    var snapshot: String?

    @Flag(name: .customShort("p"), help: "Show progress (percent, bytes, rate, time left) on stderr, as whole lines when stderr is not a terminal; shown anyway when both stdout and stderr are terminals.")
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
            guard CreateCommand.creatable.contains(out) else {
                throw BlockError.usage("-O \(outputFormat): rawmount converts to \(CreateCommand.creatable.joined(separator: ", "))")
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
            // On a terminal when asked or when both outputs are one; whole lines into a pipe
            // or a log when asked (-p), as qemu-img gives them there.
            let tty = isatty(STDERR_FILENO) == 1
            let bar = Progress(total: src.virtualSize, mode: json ? .off : tty ? (progress || isatty(STDOUT_FILENO) == 1 ? .terminal : .off)
                                                                     : progress ? .lines : .off)
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
/// image already reads as zeros there).
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
        let pieces = Pieces(source: source, runs: runs, size: Self.piece)
        defer { pieces.deallocate() }
        // Piece i+1 is read on a serial queue into the other buffer while piece i is written
        // (the read-ahead DiskHasher uses).
        let reader = DispatchQueue(label: "rawmount.convert-read")
        let read = pieces.read
        var current = runs.isEmpty ? nil : read(0)
        for (i, run) in runs.enumerated() {
            if let e = current?.error { throw e }
            let group = DispatchGroup()
            let box = Pieces.Box()
            if i + 1 < runs.count { reader.async(group: group) { box.value = read(i + 1) } }
            let buf = pieces.buffers[i % 2]
            totals.read += UInt64(run.length)
            var b = 0
            while b < run.length {
                // The longest stretch of blocks that are not all zeros, written in one call.
                while b < run.length, Self.isZero(buf, b, min(Self.block, run.length - b)) { b += Self.block }
                let start = b
                while b < run.length, !Self.isZero(buf, b, min(Self.block, run.length - b)) { b += Self.block }
                let end = min(b, run.length)
                if end > start {
                    do {
                        try destination.write(UnsafeRawBufferPointer(rebasing: buf[start..<end]), at: run.offset + UInt64(start))
                    } catch { group.wait(); throw error }
                    totals.written += UInt64(end - start)
                }
            }
            group.wait()
            current = box.value
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

/// The two piece buffers and the source, shared with the read-ahead queue.
private final class Pieces: @unchecked Sendable {
    final class Ahead: @unchecked Sendable { var error: (any Error)? }
    final class Box: @unchecked Sendable { var value: Ahead? }
    let source: BlockDevice
    let runs: [(offset: UInt64, length: Int)]
    let buffers: [UnsafeMutableRawBufferPointer]

    init(source: BlockDevice, runs: [(offset: UInt64, length: Int)], size: Int) {
        self.source = source; self.runs = runs
        buffers = (0..<2).map { _ in UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 4096) }
    }

    @Sendable func read(_ i: Int) -> Ahead {
        let a = Ahead()
        do { try source.read(into: UnsafeMutableRawBufferPointer(rebasing: buffers[i % 2][0..<runs[i].length]), at: runs[i].offset) } catch { a.error = error }
        return a
    }

    func deallocate() { for b in buffers { b.deallocate() } }
}
