import BlockEngine

extension ImageFormat { public static let bochs = ImageFormat(name: "bochs") }

/// Bochs in the format registry, read-only (forensic use): growing, undoable (over its base)
/// and sparse images (stacked on the one numbered below).
enum BochsFormat: FormatOpening {
    static let format = ImageFormat.bochs
    static func probe(_ head: [UInt8]) -> Bool { BochsHeader.probe(head) || BochsSparseHeader.probe(head) }

    /// Bochs images: a growing redolog stands alone; an undoable one reads through its base
    /// (<base>.redolog); a sparse image stacks on the one numbered below it, as Bochs does.
    static func open(_ r: OpenRequest) throws -> BlockDevice {
        let file = r.file, path = r.path
        let head = try file.readBytes(count: 4, at: 0, what: "Bochs header")
        guard BochsSparseHeader.hasMagic(head) else {
            let driver = try BochsDriver(file: file)
            guard driver.header.isUndoable else { return BlockDevice(driver: driver) }
            guard let basePath = BochsDriver.basePath(ofRedolog: path) else {
                throw BlockError.invalid(file: path, field: "base image",
                                         detail: "this Bochs undoable redolog reads through its base image, which Bochs finds by name (<base>.redolog); rename it so")
            }
            do {
                let base = try r.related(basePath)
                // Bochs refuses a base whose mtime is not the redolog's timestamp; evidence
                // copies often lose mtimes, so rawmount reads them and says so.
                if let stamp = driver.header.timestamp, stamp != 0, let st = base.driver.file.fileStatus(),
                   case let baseStamp = BochsHeader.fatTimestamp(st.st_mtim.tv_sec), baseStamp != stamp {
                    r.note("its base \(basePath) was modified after the redolog was made "
                        + "(redolog \(BochsHeader.fatText(stamp)), base \(BochsHeader.fatText(baseStamp))); "
                        + "Bochs would refuse the pair, rawmount shows them as they are")
                }
                return BlockDevice(driver: driver, backing: base)
            } catch let e as BlockError where e.isFileNotFound {
                throw BlockError.invalid(file: path, field: "base image", detail: "'\(basePath)' not found (an undoable redolog reads through it)")
            }
        }
        let driver = try BochsSparseDriver(file: file)
        guard let parentPath = BochsSparseDriver.parentPath(of: path) else { return BlockDevice(driver: driver) }
        let parent = try r.related(parentPath)
        // Bochs refuses a stack whose layers differ in page size or page count.
        guard let p = parent.driver as? BochsSparseDriver, p.header.pageSize == driver.header.pageSize,
              p.header.pages == driver.header.pages else {
            throw BlockError.invalid(file: path, field: "parent image",
                                     detail: "\(parentPath) (which Bochs stacks this image on, by name) is not a Bochs sparse image with the same page size and page count")
        }
        return BlockDevice(driver: driver, backing: parent)
    }
}
