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

    @Option(name: .customShort("B"), help: ArgumentHelp("DESTINATION gets this backing file (as -o backing_file=); only what differs from it is written, as qemu-img convert -B does.", valueName: "backing"))
    var backing: String?

    @Option(name: .customShort("F"), help: ArgumentHelp("Format of -B's backing file (probed when omitted).", valueName: "format"))
    var backingFormat: String?

    @Flag(name: .customShort("c"), help: "qcow2: store clusters deflated (those that do not shrink are stored as they are), as qemu-img convert -c; reads of DESTINATION then inflate them.")
    var compress = false

    @Flag(name: .customShort("n"), help: "Do not create DESTINATION: write into the existing image (its format from -O, its size at least SOURCE's); ranges that read as zeros are made zero there, as qemu-img convert -n does.")
    var noCreate = false

    @Option(name: .customShort("S"), help: ArgumentHelp("Blocks of this many bytes that read as zeros are not written (a multiple of 512; default 4k, as qemu-img); 0 writes every byte of the data runs.", valueName: "size"))
    var sparseSize: String?

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
            let sparse = try sparseSize.map(parseSize) ?? UInt64(ImageCopy.block)
            guard sparse % 512 == 0, sparse <= UInt64(ImageCopy.piece) else {
                throw BlockError.usage("-S \(sparseSize ?? ""): a multiple of 512 up to 4M (0: write every byte)")
            }
            var streamOptimized = false
            if compress {
                guard out == "qcow2" || out == "vmdk" else { throw BlockError.usage("-c: rawmount writes compressed clusters into qcow2 (and streamOptimized VMDK)") }
                guard !noCreate, backing == nil else { throw BlockError.usage("-c writes into a new image without a backing file: no -n or -B") }
            }
            if noCreate {
                guard backing == nil, creationOptions.isEmpty else { throw BlockError.usage("-n writes into an existing image: no -B or -o") }
            } else {
                let backingArgs = (backing.map { ["-b", $0] } ?? []) + (backingFormat.map { ["-F", $0] } ?? [])
                var create = try CreateCommand.parse(["-f", out, "-q"] + creationOptions.flatMap { ["-o", $0] } + backingArgs + [destination, String(src.virtualSize)])
                try create.applyCreationOptions()
                // A streamOptimized VMDK is written once, in order, every grain compressed: not
                // through the engine, which writes in place.
                streamOptimized = out == "vmdk" && create.subformat == "streamOptimized"
                if compress && out == "vmdk" && !streamOptimized {
                    throw BlockError.usage("-c -O vmdk: compressed grains need -o subformat=streamOptimized")
                }
                if streamOptimized && backing != nil { throw BlockError.usage("a streamOptimized VMDK has no backing file") }
                try replaceDestination(sourceChain: src)
                try create.createImage()
            }
            ImageFile.syncDisabled.store(cache == "unsafe", ordering: .relaxed)
            // A stream is appended to by its writer (which holds the lock); the image opened
            // read-only only stands in as the copy's destination, which it never writes.
            let stream = streamOptimized ? try VMDKStreamWriter(path: destination) : nil
            if let stream { try ImageLock.acquire(stream.file, writable: true) }
            let dst = try ImageOpener.open(path: destination, options: .init(writable: stream == nil, format: ImageFormat(rawValue: out), lock: stream == nil))
            if let stream, !dst.driver.file.isSameFile(as: stream.file) {
                try? dst.close()
                throw BlockError.invalid(file: destination, field: "file", detail: "it was replaced while being written")
            }
            if noCreate && dst.virtualSize < src.virtualSize {
                try? dst.close()
                throw BlockError.usage("\(destination): \(dst.virtualSize) bytes, smaller than the \(src.virtualSize)-byte source")
            }
            let began = monotonicSeconds()
            // On a terminal when asked or when both outputs are one; whole lines into a pipe
            // or a log when asked (-p), as qemu-img gives them there.
            let tty = isatty(STDERR_FILENO) == 1
            let bar = Progress(total: src.virtualSize, mode: json ? .off : tty ? (progress || isatty(STDOUT_FILENO) == 1 ? .terminal : .off)
                                                                     : progress ? .lines : .off)
            let copied: ImageCopy.Totals
            do {
                // With a backing file (-B, -o backing_file=), only what differs from it.
                // -n: the existing image may hold anything, so zeros are written as zeros.
                if compress && dst.backing != nil { throw BlockError.usage("-c writes into a new image without a backing file: no -o backing_file") }
                let sink: (any CompressedClusterSink)? = stream ?? (compress ? dst.driver as? QCOW2Driver : nil)
                copied = try ImageCopy(source: src, destination: dst, zeroing: noCreate, against: noCreate ? nil : dst.backing,
                                       sparseBlock: Int(sparse), compressInto: sink).run { at, _ in bar.show(at) }
                try stream?.finish()
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
