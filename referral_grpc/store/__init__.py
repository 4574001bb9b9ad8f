"""The store: Peewee models, the database and its transactions, and the migrations runner."""
