import BlockEngine

/// How a VMDK driver reaches the files its descriptor names, split so that a split image's
/// thousands of extents open and lock on every core while the bookkeeping stays in order.
public struct VMDKExtentFiles {
    /// Opens a named file under the referenced-file policy; safe from several threads.
    let open: @Sendable (String) throws -> ImageFile
    /// In descriptor order, on one thread: the file to use for one just opened (an earlier
    /// one with the same identity when a file is named twice, so its locks do not conflict
    /// with themselves), and whether it is new.
    let adopt: (ImageFile) -> (file: ImageFile, isNew: Bool)
    /// Locks a newly adopted file; safe from several threads.
    let lock: @Sendable (ImageFile) throws -> Void

    public init(open: @escaping @Sendable (String) throws -> ImageFile,
                adopt: @escaping (ImageFile) -> (file: ImageFile, isNew: Bool),
                lock: @escaping @Sendable (ImageFile) throws -> Void) {
        self.open = open
        self.adopt = adopt
        self.lock = lock
    }

    /// One file, start to end (flat extents: a handful).
    func openOne(_ path: String) throws -> ImageFile {
        let (file, isNew) = adopt(try open(path))
        if isNew { try lock(file) }
        return file
    }
}
